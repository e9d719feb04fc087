//! The one HTTP client for talking to a running agent: `gds-agent stalls` and `gds-agent top`,
//! the end-to-end tests, the VM scenarios and xtask (which also asks its local Prometheus).
//! The agent serves plain HTTP/1.1 on loopback; a std TcpStream is all this needs.
//!
//! xtask compiles this file into itself (`#[path]`): it cannot depend on gds-user, whose build
//! needs the tools xtask installs. So this file uses std and thiserror only.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    process::{Child, ExitStatus},
    time::{Duration, Instant},
};

use thiserror::Error;

/// How long a request may wait for the agent to answer, unless [`TIMEOUT_ENV`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Seconds (`10`, `0.5`) or milliseconds (`500ms`) a request may take, from connecting to the
/// last byte of the answer.
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
    #[error("{TIMEOUT_ENV}={0:?}: expected seconds (10, 0.5) or milliseconds (500ms), more than 0")]
    Timeout(String),
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
        what: &'static str,
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
        Ok(v) => parse_timeout(&v).ok_or(ClientError::Timeout(v)),
        Err(_) => Ok(DEFAULT_TIMEOUT),
    }
}

/// `10`, `0.5`, `2s`, `500ms`.
pub fn parse_timeout(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (number, scale) = match s.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    let secs = number.trim().parse::<f64>().ok()? * scale;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
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

    /// GET `path` over a fresh connection (`Connection: close`), whatever the answer's status.
    /// The whole exchange takes at most [`Client::timeout`] and reads at most
    /// [`MAX_ANSWER_BYTES`].
    pub fn request(&self, path: &str) -> Result<Response, ClientError> {
        let (peer, addr) = (self.peer, self.addr);
        // One deadline for the whole answer: a per-read timeout lets a peer that trickles a
        // byte now and then hold the client forever.
        let deadline = Instant::now() + self.timeout;
        let no_answer = |received: usize| ClientError::NoAnswer {
            peer,
            addr,
            timeout: self.timeout,
            received,
        };
        let io_err = |received: usize| {
            move |source: std::io::Error| match source.kind() {
                // SO_RCVTIMEO / SO_SNDTIMEO expiring reads as EAGAIN on Linux.
                ErrorKind::WouldBlock | ErrorKind::TimedOut => no_answer(received),
                _ => ClientError::Connect { peer, addr, source },
            }
        };
        // What is left of the deadline; `None` once it has passed.
        let left =
            || Some(deadline.checked_duration_since(Instant::now())?).filter(|d| !d.is_zero());
        let conn_err = |source| ClientError::Connect { peer, addr, source };
        let connect_timeout = CONNECT_TIMEOUT.min(left().ok_or_else(|| no_answer(0))?);
        let mut s = TcpStream::connect_timeout(&addr, connect_timeout).map_err(|source| {
            match source.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut
                    if connect_timeout < CONNECT_TIMEOUT =>
                {
                    no_answer(0)
                }
                _ => conn_err(source),
            }
        })?;
        s.set_write_timeout(left()).map_err(conn_err)?;
        // One write: a server may answer and close after the first segment of a request.
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).map_err(io_err(0))?;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            // Each read may wait only for what is left of the whole answer's time.
            let left = left().ok_or_else(|| no_answer(buf.len()))?;
            s.set_read_timeout(Some(left)).map_err(conn_err)?;
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    if buf.len() + n > MAX_ANSWER_BYTES {
                        return Err(ClientError::TooBig { peer, addr });
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(buf.len())(e)),
            }
        }
        self.parse(&buf)
    }

    fn parse(&self, raw: &[u8]) -> Result<Response, ClientError> {
        let malformed = |what| ClientError::Malformed {
            peer: self.peer,
            addr: self.addr,
            what,
        };
        let end = find(raw, b"\r\n\r\n").ok_or_else(|| malformed("no header end"))?;
        let head = String::from_utf8_lossy(&raw[..end]);
        let body = &raw[end + 4..];
        let status = head.lines().next().unwrap_or_default();
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| malformed("no status code"))?;
        let chunked = head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("transfer-encoding:") && l.contains("chunked")
        });
        let body = if chunked {
            dechunk(body).map_err(malformed)?
        } else {
            body.to_vec()
        };
        Ok(Response {
            code,
            status: status.to_owned(),
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

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Transfer-Encoding: chunked (RFC 9112 §7.1); chunk extensions are ignored.
fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    loop {
        let eol = find(body, b"\r\n").ok_or("chunk size")?;
        let size = std::str::from_utf8(&body[..eol]).map_err(|_| "chunk size")?;
        let size = size.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| "chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let rest = &body[eol + 2..];
        let chunk = rest.get(..size).ok_or("short chunk")?;
        out.extend_from_slice(chunk);
        body = rest[size..].strip_prefix(b"\r\n").unwrap_or(&rest[size..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert_eq!(dechunk(b"3;x=y\r\nabc\r\n0\r\n\r\n").unwrap(), b"abc");
        assert_eq!(dechunk(b"5\r\nabc"), Err("short chunk"));
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_timeout("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_timeout("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("0"), None);
        assert_eq!(parse_timeout("-1"), None);
        assert_eq!(parse_timeout("soon"), None);
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
            for b in b"HTTP/1.1 200 OK\r\n\r\n".iter().cycle() {
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
