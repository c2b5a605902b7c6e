//! The server side of a TLS connection, on rustls's unbuffered API: a stream that holds no
//! buffer while its connection is idle.
//!
//! rustls's buffered connection (what `tokio-rustls` drives) keeps a 4 KiB receive buffer for
//! as long as the connection lives, zero-filled, so every page of it is resident: a sixth of
//! what a connected agent cost a provider. Here the buffers are ours, and the invariant is:
//!
//! **Between calls, `incoming` holds only bytes rustls cannot use yet (a partial record),
//! `plain` only decrypted bytes the reader has not taken, `outgoing` only encrypted bytes the
//! socket has not taken — and each is freed the moment it is empty.** An idle connection holds
//! rustls's state and nothing else.
//!
//! rustls is always given the whole of `incoming`, less what it said to discard: while it joins
//! a handshake message it keeps positions in that buffer, and another slice would not hold them.
//!
//! Bytes are read from the socket into a buffer on the stack and only what rustls must keep is
//! copied into `incoming`. Writes are encrypted into `outgoing` and sent at once; a write waits
//! while the previous one is still unsent, which is the back-pressure the caller sees.
//! Whatever rustls queues on its own (handshake messages, session tickets, the answer to a key
//! update, an alert after an error) is encoded into `outgoing` ahead of anything after it.
use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::server::UnbufferedServerConnection;
use tokio_rustls::rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use tonic::transport::server::Connected;

/// Bytes read from the socket at once (on the stack): a whole TLS record and its header.
const RECEIVE: usize = 16 * 1024 + 512;

/// The most TLS bytes kept waiting for rustls: a handshake message being joined (rustls stops
/// at 64 KiB) and the record after it.
const MAX_PENDING: usize = 64 * 1024 + RECEIVE;

/// The most plaintext encrypted by one write; the rest waits for the next.
const MAX_BATCH: usize = 256 * 1024;

/// The largest plaintext in one TLS record, and an upper bound on a record's overhead
/// (header, explicit nonce, content type, tag) in TLS 1.2 and 1.3.
const RECORD: usize = 16 * 1024;
const RECORD_OVERHEAD: usize = 64;

/// A server's TLS connection over `IO`, once its handshake is done ([`ServerTls::accept`]).
pub struct ServerTls<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Received bytes rustls has not taken yet.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken, from `plain_at` on.
    plain: Vec<u8>,
    plain_at: usize,
    /// Encrypted bytes the socket has not taken, from `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer sends nothing more: its close_notify, or the end of the stream.
    read_closed: bool,
    /// Our close_notify is queued.
    write_closed: bool,
    /// The client's certificate chain, as the handshake verified it.
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// What a turn of rustls's state machine is taken for.
enum Want<'a, 'b> {
    /// The handshake's next step.
    Handshake,
    /// Decrypted bytes, straight into the reader's buffer (what does not fit waits in `plain`).
    Read(&'a mut ReadBuf<'b>),
    /// To encrypt these bytes.
    Write(&'a [u8]),
}

/// What one turn of rustls's state machine came to.
enum Progress {
    /// Something was done (a message encoded or sent, the peer's close noted): turn again.
    Again,
    /// Decrypted bytes were given to the reader or are waiting in `plain`.
    Plain,
    /// Nothing more can happen without bytes from the peer.
    NeedInput,
    /// The plaintext given was encrypted into `outgoing`.
    Wrote,
    /// Both sides have closed.
    Closed,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> ServerTls<IO> {
    /// Runs the server side of a handshake over `io`, and returns the connection once the
    /// client is verified (or has failed: the alert rustls queued is sent first, if the
    /// socket takes it at once).
    pub async fn accept(io: IO, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
        let mut tls = Self {
            io,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            sent: 0,
            read_closed: false,
            write_closed: false,
            certs: None,
        };
        poll_fn(|cx| tls.poll_handshake(cx)).await?;
        tls.certs = tls.conn.peer_certificates().map(|c| Arc::new(c.to_vec()));
        Ok(tls)
    }

    /// The underlying connection.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// The client's certificate chain, leaf first, if it presented one.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.certs.as_deref().map(Vec::as_slice)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match self.turn(cx, Want::Handshake)? {
                Progress::Again | Progress::Plain | Progress::Wrote => {}
                Progress::Closed => return Poll::Ready(Err(closed_in_handshake())),
                Progress::NeedInput => {
                    if ready!(self.poll_receive(cx))? == 0 {
                        return Poll::Ready(Err(closed_in_handshake()));
                    }
                }
            }
        }
    }

    /// One turn of rustls's state machine over what has been received, for what is wanted.
    /// On an error, the alert rustls queued is encoded and offered to the socket before the
    /// error is returned.
    fn turn(&mut self, cx: &mut Context<'_>, want: Want<'_, '_>) -> io::Result<Progress> {
        match self.turn_once(want) {
            Ok(progress) => Ok(progress),
            Err(e) => {
                self.encode_alerts();
                let _ = self.poll_send(cx);
                Err(io::Error::new(io::ErrorKind::InvalidData, e))
            }
        }
    }

    fn turn_once(&mut self, mut want: Want<'_, '_>) -> Result<Progress, rustls::Error> {
        let status = self.conn.process_tls_records(&mut self.incoming);
        let mut discard = status.discard;
        let progress = match status.state {
            Err(e) => Err(e),
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                let mut got = Ok(Progress::Plain);
                while let Some(record) = records.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            let mut payload = record.payload;
                            if let Want::Read(buf) = &mut want
                                && self.plain_at == self.plain.len()
                            {
                                let n = buf.remaining().min(payload.len());
                                buf.put_slice(&payload[..n]);
                                payload = &payload[n..];
                            }
                            self.plain.extend_from_slice(payload);
                        }
                        Err(e) => {
                            got = Err(e);
                            break;
                        }
                    }
                }
                got
            }
            Ok(ConnectionState::EncodeTlsData(mut message)) => {
                // `AlreadyEncoded` cannot come: each state is encoded once.
                let _ = append(&mut self.outgoing, 0, |out| message.encode(out));
                Ok(Progress::Again)
            }
            // What was encoded is sent before anything after it: `outgoing` is in order.
            Ok(ConnectionState::TransmitTlsData(sent)) => {
                sent.done();
                Ok(Progress::Again)
            }
            Ok(ConnectionState::PeerClosed) => {
                self.read_closed = true;
                Ok(Progress::Again)
            }
            Ok(ConnectionState::Closed) => {
                self.read_closed = true;
                Ok(Progress::Closed)
            }
            Ok(ConnectionState::WriteTraffic(mut traffic)) => match want {
                Want::Handshake | Want::Read(_) => Ok(Progress::NeedInput),
                Want::Write(data) => {
                    let records = data.len().div_ceil(RECORD).max(1);
                    let room = data.len() + records * RECORD_OVERHEAD;
                    match append(&mut self.outgoing, room, |out| traffic.encrypt(data, out)) {
                        Ok(()) => Ok(Progress::Wrote),
                        Err(_) => Err(rustls::Error::EncryptError),
                    }
                }
            },
            Ok(ConnectionState::BlockedHandshake) => Ok(Progress::NeedInput),
            Ok(ConnectionState::ReadEarlyData(_)) => {
                Err(rustls::Error::General("early data, which this server does not accept".into()))
            }
            Ok(_) => Err(rustls::Error::General("a TLS state this server does not know".into())),
        };
        self.discard(discard);
        progress
    }

    /// Encodes whatever rustls queued after an error (its alert), so that it can be sent.
    fn encode_alerts(&mut self) {
        for _ in 0..8 {
            let status = self.conn.process_tls_records(&mut self.incoming);
            let discard = status.discard;
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut message)) => {
                    let _ = append(&mut self.outgoing, 0, |out| message.encode(out));
                }
                Ok(ConnectionState::TransmitTlsData(sent)) => sent.done(),
                _ => return self.discard(discard),
            }
            self.discard(discard);
        }
    }

    fn discard(&mut self, n: usize) {
        if n >= self.incoming.len() {
            self.incoming = Vec::new();
        } else if n > 0 {
            self.incoming.drain(..n);
        }
    }

    /// Reads what the socket has into `incoming`: the number of bytes, 0 at its end.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut space = [MaybeUninit::<u8>::uninit(); RECEIVE];
        let mut buf = ReadBuf::uninit(&mut space);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let got = buf.filled();
        if self.incoming.len() + got.len() > MAX_PENDING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_PENDING} bytes of TLS records rustls cannot use yet"),
            )));
        }
        self.incoming.extend_from_slice(got);
        Poll::Ready(Ok(got.len()))
    }

    /// Sends what `outgoing` holds; frees it once the socket has taken it all.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.sent = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Whether nothing is held for this connection but rustls's own state (see the header).
    #[cfg(test)]
    fn holds_no_buffer(&self) -> bool {
        self.incoming.capacity() == 0 && self.plain.capacity() == 0 && self.outgoing.capacity() == 0
    }
}

/// Appends to `out` what `write` puts into the room it is given: `room` bytes first, then as
/// many as rustls says it needs. On any other error `out` is as it was.
fn append<E: Needs>(
    out: &mut Vec<u8>,
    room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(), E> {
    let start = out.len();
    out.resize(start + room, 0);
    loop {
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match e.needs() {
                Some(size) => out.resize(start + size, 0),
                None => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

/// rustls's "the buffer is too small" among its encoding errors.
trait Needs {
    /// The room the buffer must have, when that is the error.
    fn needs(&self) -> Option<usize>;
}

impl Needs for EncodeError {
    fn needs(&self) -> Option<usize> {
        match self {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
            _ => None,
        }
    }
}

impl Needs for EncryptError {
    fn needs(&self) -> Option<usize> {
        match self {
            EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => Some(*required_size),
            _ => None,
        }
    }
}

fn closed_in_handshake() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed during the TLS handshake")
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerTls<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_at);
                buf.put_slice(&this.plain[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plain.len() {
                    this.plain = Vec::new();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            // What rustls queued (a key update's answer, session tickets) leaves first.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            match this.turn(cx, Want::Read(buf))? {
                Progress::Plain if buf.filled().len() > before => return Poll::Ready(Ok(())),
                Progress::Again | Progress::Plain | Progress::Wrote | Progress::Closed => {}
                Progress::NeedInput => {
                    if ready!(this.poll_receive(cx))? == 0 {
                        this.read_closed = true;
                        if !this.incoming.is_empty() {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the connection closed in the middle of a TLS record",
                            )));
                        }
                    }
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerTls<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // At most one write waits for the socket: what is unsent goes before more is taken.
        ready!(this.poll_send(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the TLS connection is closed")));
        }
        let data = &buf[..buf.len().min(MAX_BATCH)];
        loop {
            match this.turn(cx, Want::Write(data))? {
                Progress::Wrote => {
                    if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Ready(Ok(data.len()));
                }
                // Records the reader has not asked for yet (never, as `incoming` holds only a
                // partial record between calls): its task is this one, woken to take them.
                Progress::Plain => cx.waker().wake_by_ref(),
                Progress::Again => {}
                Progress::Closed => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the TLS connection is closed")));
                }
                Progress::NeedInput => {
                    return Poll::Ready(Err(io::Error::other("the TLS connection may not send application data")));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            let status = this.conn.process_tls_records(&mut this.incoming);
            let discard = status.discard;
            if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
                let _ = append(&mut this.outgoing, 0, |out| traffic.queue_close_notify(out));
            }
            this.discard(discard);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// What tonic hands a service about a TLS connection: the underlying connection's information
/// and the client's certificate chain (leaf first), one allocation per connection.
#[derive(Clone, Debug)]
pub struct TlsConnectInfo<T> {
    inner: T,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl<T> TlsConnectInfo<T> {
    /// The underlying connection's information (its addresses).
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The client's certificate chain, leaf first, if it presented one.
    pub fn peer_certs(&self) -> Option<Arc<Vec<CertificateDer<'static>>>> {
        self.certs.clone()
    }
}

impl<IO: Connected> Connected for ServerTls<IO> {
    type ConnectInfo = TlsConnectInfo<IO::ConnectInfo>;
    fn connect_info(&self) -> Self::ConnectInfo {
        TlsConnectInfo { inner: self.io.connect_info(), certs: self.certs.clone() }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::rustls::pki_types::{PrivateKeyDer, ServerName};

    use super::*;
    use crate::tls::{ClientAuth, Paths, Role, Tls, pki};

    /// A provider's live server configuration (client certificates required) and an agent's
    /// client configuration, from a CA made for the test.
    struct Setup {
        _dir: tempfile::TempDir,
        server: Arc<rustls::ServerConfig>,
        agent: Arc<rustls::ClientConfig>,
        anonymous: Arc<rustls::ClientConfig>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), "test CA").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let day = Duration::from_secs(86400);
        let issue =
            |role, name: &str| pki::issue(dir.path(), role, name, &[], now, day, &dir.path().join(name)).unwrap();
        let (crt, key) = issue(Role::Provider, "provider-1");
        let ca = dir.path().join(pki::CA_CERT);
        let tls = Tls::load(Paths { ca: ca.clone(), cert: crt, key }).unwrap();
        let server = Arc::new(tls.server_config(ClientAuth::Required));
        let mut roots = rustls::RootCertStore::empty();
        for der in crate::tls::pem_ders(&std::fs::read(&ca).unwrap()) {
            roots.add(CertificateDer::from(der)).unwrap();
        }
        let client = || {
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone())
        };
        let (crt, key) = issue(Role::Agent, "pc-1");
        let chain = crate::tls::pem_ders(&std::fs::read(crt).unwrap()).into_iter().map(CertificateDer::from).collect();
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(key).unwrap()).unwrap();
        let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let agent = Arc::new(client().with_client_auth_cert(chain, key).unwrap());
        let anonymous = Arc::new(client().with_no_client_auth());
        Setup { _dir: dir, server, agent, anonymous }
    }

    /// A connected pair: the server's side through [`ServerTls::accept`], the client's through
    /// tokio-rustls (what agents and sites use).
    async fn pair(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (io::Result<ServerTls<TcpStream>>, io::Result<tokio_rustls::client::TlsStream<TcpStream>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            ServerTls::accept(tcp, server).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let connected = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await;
        (accepting.await.unwrap(), connected)
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer_and_knows_its_client() {
        let s = setup();
        let (server, client) = pair(s.server, s.agent).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        let leaf = server.peer_certificates().and_then(|c| c.first()).expect("the client's certificate");
        assert_eq!(crate::tls::peer_of(leaf).unwrap().name, "pc-1");
        assert!(server.holds_no_buffer(), "nothing is held once the handshake is done");

        // A check and its answer, the sizes a real one has.
        client.write_all(&[7u8; 300]).await.unwrap();
        client.flush().await.unwrap();
        let mut request = [0u8; 300];
        server.read_exact(&mut request).await.unwrap();
        assert_eq!(request, [7u8; 300]);
        server.write_all(&[9u8; 5200]).await.unwrap();
        server.flush().await.unwrap();
        let mut answer = vec![0u8; 5200];
        client.read_exact(&mut answer).await.unwrap();
        assert!(answer.iter().all(|&b| b == 9));
        assert!(server.holds_no_buffer(), "nothing is held once the exchange is done");
        let info = server.connect_info();
        assert_eq!(info.peer_certs().unwrap().first(), server.peer_certificates().unwrap().first());
    }

    #[tokio::test]
    async fn bytes_arrive_intact_both_ways_through_small_reads_and_a_key_update() {
        let s = setup();
        let (server, client) = pair(s.server, s.agent).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();

        let sending = {
            let up = up.clone();
            tokio::spawn(async move {
                client.write_all(&up[..1_000_000]).await.unwrap();
                client.get_mut().1.refresh_traffic_keys().unwrap();
                client.write_all(&up[1_000_000..]).await.unwrap();
                client.flush().await.unwrap();
                let mut got = vec![0u8; 3_000_000];
                client.read_exact(&mut got).await.unwrap();
                got
            })
        };
        // Reads smaller than a record, so that decrypted bytes wait for the next read.
        let mut got = Vec::new();
        let mut small = [0u8; 999];
        while got.len() < up.len() {
            let n = server.read(&mut small).await.unwrap();
            assert!(n > 0, "the stream ended after {} bytes", got.len());
            got.extend_from_slice(&small[..n]);
        }
        assert!(got == up, "the client's bytes arrived changed");
        server.write_all(&down).await.unwrap();
        server.flush().await.unwrap();
        assert!(sending.await.unwrap() == down, "the server's bytes arrived changed");
        assert!(server.holds_no_buffer());
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_told_why() {
        let s = setup();
        let (server, client) = pair(s.server, s.anonymous).await;
        let server = server.err().expect("the handshake fails");
        assert!(server.to_string().contains("certificate"), "{server}");
        // In TLS 1.3 the client finishes first; the server's alert ends its first read.
        let err = match client {
            Err(e) => e,
            Ok(mut c) => c.read(&mut [0u8; 16]).await.expect_err("the alert, not bytes"),
        };
        assert!(err.to_string().contains("CertificateRequired"), "{err}");
    }

    #[tokio::test]
    async fn closing_is_clean_both_ways() {
        let s = setup();
        let (server, client) = pair(s.server, s.agent).await;
        let (mut server, mut client) = (server.unwrap(), client.unwrap());
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words", "the client's close_notify ends the server's reading");
        server.write_all(b"goodbye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("a close_notify, not a truncation");
        assert_eq!(got, b"goodbye");
        assert!(server.write_all(b"more").await.is_err(), "nothing is sent after our close_notify");
    }
}
