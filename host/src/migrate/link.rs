//! The link between two hosts: one TCP connection with mutual TLS
//! (rustls; both sides present a certificate signed by a CA the other
//! trusts), carrying framed messages.
//!
//! A frame is a 4-byte big-endian header length, an 8-byte big-endian
//! payload length, the header (JSON) and the payload (bytes: a state,
//! connection buffers, a component). A header is at most
//! [`MAX_HEADER`]; the receiver of a frame says how large a payload it
//! takes, so a peer cannot make it allocate more.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest header a peer may send.
pub const MAX_HEADER: u32 = 1 << 20;

/// Where a host's TLS identity and trust come from (PEM files).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This host's certificate (and any intermediates).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA certificate(s) a peer's certificate must be signed by.
    pub ca: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read the {what} {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("the {what} {} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        bail!(
            "the {what} {} holds no certificate (expected PEM \"BEGIN CERTIFICATE\")",
            path.display()
        );
    }
    Ok(certs)
}

impl TlsFiles {
    fn identity(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let chain = certs(&self.cert, "certificate (--tls-cert)")?;
        let key = PrivateKeyDer::from_pem_file(&self.key).with_context(|| {
            format!(
                "cannot read a private key from {} (--tls-key; PEM, PKCS#8, PKCS#1 or SEC1)",
                self.key.display()
            )
        })?;
        Ok((chain, key))
    }

    fn roots(&self) -> Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        for ca in certs(&self.ca, "CA certificate (--tls-ca)")? {
            roots
                .add(ca)
                .with_context(|| format!("the CA certificate {} is unusable", self.ca.display()))?;
        }
        Ok(Arc::new(roots))
    }

    /// The receiving side: requires a client certificate signed by the CA.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider())
            .build()
            .context("building the client certificate check")?;
        let (chain, key) = self.identity()?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .context("this host's certificate and key do not go together")?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }

    /// The sending side: presents its certificate, checks the peer's.
    pub fn connector(&self) -> Result<tokio_rustls::TlsConnector> {
        let (chain, key) = self.identity()?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .context("this host's certificate and key do not go together")?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// Either end of an established link.
pub struct Link {
    stream: Box<dyn Stream>,
    /// Who is at the other end, for messages.
    pub peer: SocketAddr,
}

pub(crate) trait Stream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

impl Link {
    /// Connects to a receiver at `addr` and checks that its certificate
    /// names `name` (an IP address or a DNS name).
    pub async fn connect(addr: SocketAddr, name: &str, tls: &TlsFiles) -> Result<Link> {
        let connector = tls.connector()?;
        let server_name = ServerName::try_from(name.to_string())
            .with_context(|| format!("`{name}` is not a host name or IP address"))?;
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to the receiver at {addr}"))?;
        tcp.set_nodelay(true)?;
        let stream = connector
            .connect(server_name, tcp)
            .await
            .with_context(|| format!("TLS with the receiver at {addr} (as `{name}`) failed"))?;
        Ok(Link {
            stream: Box::new(stream),
            peer: addr,
        })
    }

    /// Completes the TLS handshake of a connection the receiver accepted;
    /// fails for a sender whose certificate the CA did not sign.
    pub async fn accept(tcp: TcpStream, acceptor: &tokio_rustls::TlsAcceptor) -> Result<Link> {
        let peer = tcp.peer_addr()?;
        tcp.set_nodelay(true)?;
        let stream = acceptor
            .accept(tcp)
            .await
            .with_context(|| format!("TLS with the sender at {peer} failed"))?;
        Ok(Link {
            stream: Box::new(stream),
            peer,
        })
    }

    /// Sends `message` with `payload` (the pieces, concatenated).
    pub async fn send<T: Serialize>(&mut self, message: &T, payload: &[&[u8]]) -> Result<()> {
        write_frame(&mut self.stream, message, payload).await
    }

    /// Receives a message and its payload, refusing a payload larger than
    /// `max_payload` bytes.
    pub async fn recv<T: DeserializeOwned>(&mut self, max_payload: u64) -> Result<(T, Vec<u8>)> {
        read_frame(&mut self.stream, self.peer, max_payload).await
    }

    /// Splits the link into a receiving and a sending half, for relaying
    /// both ways at once.
    pub fn into_split(self) -> (LinkRx, LinkTx) {
        let (rx, tx) = tokio::io::split(self.stream);
        (
            LinkRx {
                stream: rx,
                peer: self.peer,
            },
            LinkTx { stream: tx },
        )
    }

    /// Ends the link cleanly (TLS close_notify).
    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

/// The receiving half of a split link.
pub struct LinkRx {
    stream: tokio::io::ReadHalf<Box<dyn Stream>>,
    peer: SocketAddr,
}

impl LinkRx {
    pub async fn recv<T: DeserializeOwned>(&mut self, max_payload: u64) -> Result<(T, Vec<u8>)> {
        read_frame(&mut self.stream, self.peer, max_payload).await
    }
}

/// The sending half of a split link.
pub struct LinkTx {
    stream: tokio::io::WriteHalf<Box<dyn Stream>>,
}

impl LinkTx {
    pub async fn send<T: Serialize>(&mut self, message: &T, payload: &[&[u8]]) -> Result<()> {
        write_frame(&mut self.stream, message, payload).await
    }

    /// Ends the link cleanly (TLS close_notify).
    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

async fn write_frame<T: Serialize>(
    stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    message: &T,
    payload: &[&[u8]],
) -> Result<()> {
    let header = serde_json::to_vec(message)?;
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut head = Vec::with_capacity(12 + header.len());
    head.extend_from_slice(&(header.len() as u32).to_be_bytes());
    head.extend_from_slice(&(len as u64).to_be_bytes());
    head.extend_from_slice(&header);
    stream.write_all(&head).await?;
    for piece in payload {
        stream.write_all(piece).await?;
    }
    stream.flush().await?;
    Ok(())
}

async fn read_frame<T: DeserializeOwned>(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    peer: SocketAddr,
    max_payload: u64,
) -> Result<(T, Vec<u8>)> {
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .await
        .with_context(|| format!("the link to {peer} closed"))?;
    let header_len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
    let payload_len = u64::from_be_bytes(head[4..].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER {
        bail!("a message header of {header_len} bytes (at most {MAX_HEADER})");
    }
    if payload_len > max_payload {
        bail!("a payload of {payload_len} bytes where at most {max_payload} are expected");
    }
    let mut header = vec![0u8; header_len as usize];
    stream.read_exact(&mut header).await?;
    let message = serde_json::from_slice(&header).context("a message this host cannot read")?;
    let mut payload = vec![0u8; payload_len as usize];
    stream.read_exact(&mut payload).await?;
    Ok((message, payload))
}

/// Certificates for tests: a CA and hosts it signs, written as PEM files
/// (the integration tests enable the `test-certs` feature for it).
#[cfg(any(test, feature = "test-certs"))]
pub mod testing {
    use super::*;

    pub struct Ca {
        issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    }

    impl Ca {
        pub fn new(name: &str) -> Ca {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate().unwrap();
            Ca {
                issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
            }
        }

        /// A host certificate for `names`, with the key and this CA, in
        /// `dir/<file>.{crt,key}` and `dir/<file>-ca.crt`.
        pub fn host(&self, dir: &Path, file: &str, names: &[&str]) -> TlsFiles {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let params = rcgen::CertificateParams::new(names).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let files = TlsFiles {
                cert: dir.join(format!("{file}.crt")),
                key: dir.join(format!("{file}.key")),
                ca: dir.join(format!("{file}-ca.crt")),
            };
            std::fs::write(&files.cert, cert.pem()).unwrap();
            std::fs::write(&files.key, key.serialize_pem()).unwrap();
            std::fs::write(&files.ca, self.issuer.pem()).unwrap();
            files
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Ca;
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Hello {
        n: u32,
    }

    /// A receiver that accepts one link and echoes one message; returns
    /// what its handshake said.
    async fn receiver(tls: TlsFiles) -> (SocketAddr, tokio::task::JoinHandle<Result<()>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tls.acceptor().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let mut link = Link::accept(tcp, &acceptor).await?;
            let (hello, payload): (Hello, Vec<u8>) = link.recv(1 << 20).await?;
            link.send(&hello, &[&payload]).await?;
            Ok(())
        });
        (addr, task)
    }

    #[tokio::test]
    async fn hosts_of_one_ca_exchange_messages() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("fleet CA");
        let a = ca.host(dir.path(), "a", &["127.0.0.1"]);
        let b = ca.host(dir.path(), "b", &["127.0.0.1"]);
        let (addr, task) = receiver(b).await;
        let mut link = Link::connect(addr, "127.0.0.1", &a).await.unwrap();
        link.send(&Hello { n: 7 }, &[b"state", b" bytes"])
            .await
            .unwrap();
        let (back, payload): (Hello, Vec<u8>) = link.recv(100).await.unwrap();
        assert_eq!(back, Hello { n: 7 });
        assert_eq!(payload, b"state bytes");
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_sender_with_a_certificate_of_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ours = Ca::new("fleet CA");
        let theirs = Ca::new("someone else's CA");
        let b = ours.host(dir.path(), "b", &["127.0.0.1"]);
        let mut intruder = theirs.host(dir.path(), "x", &["127.0.0.1"]);
        // It even trusts our CA: its own certificate is still not ours.
        intruder.ca = b.ca.clone();
        let (addr, task) = receiver(b).await;
        let sent = async {
            let mut link = Link::connect(addr, "127.0.0.1", &intruder).await?;
            link.send(&Hello { n: 1 }, &[]).await?;
            link.recv::<Hello>(0).await
        }
        .await;
        assert!(sent.is_err(), "the intruder got an answer");
        let refused = task.await.unwrap().unwrap_err();
        assert!(
            format!("{refused:#}").contains("TLS with the sender"),
            "{refused:#}"
        );
    }

    #[tokio::test]
    async fn a_receiver_with_another_name_or_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("fleet CA");
        let a = ca.host(dir.path(), "a", &["127.0.0.1"]);
        let b = ca.host(dir.path(), "b", &["b.example"]);
        let (addr, _task) = receiver(b).await;
        let err = Link::connect(addr, "127.0.0.1", &a).await.err().unwrap();
        assert!(
            format!("{err:#}").contains("TLS with the receiver"),
            "{err:#}"
        );
        // A receiver whose CA the sender does not trust.
        let other = Ca::new("other CA").host(dir.path(), "c", &["127.0.0.1"]);
        let (addr, _task) = receiver(other).await;
        let err = Link::connect(addr, "127.0.0.1", &a).await.err().unwrap();
        assert!(
            format!("{err:#}").contains("TLS with the receiver"),
            "{err:#}"
        );
    }

    #[test]
    fn missing_files_say_which_flag() {
        let files = TlsFiles {
            cert: "/nonexistent/a.crt".into(),
            key: "/nonexistent/a.key".into(),
            ca: "/nonexistent/ca.crt".into(),
        };
        let err = files.connector().err().unwrap();
        assert!(format!("{err:#}").contains("--tls-cert"), "{err:#}");
    }
}
