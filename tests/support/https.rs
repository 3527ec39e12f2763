//! An HTTPS client that verifies the server against a given CA (tokio-rustls + hyper),
//! and an in-process webhook server to point it at.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use velero_jupyterhub::policy::ClaimGlobs;
use velero_jupyterhub::server::{self, Config, Running, TlsSource};
use velero_jupyterhub::webhook::serve::ServeOptions;

pub type Response = (StatusCode, Bytes);

/// Starts the real server in-process: self-signed, loopback, random ports, no cluster.
pub async fn start_self_signed(serve: ServeOptions) -> (Running, HttpsClient) {
    let running = start(
        TlsSource::SelfSigned {
            dns_names: vec![],
            ca_out: None,
        },
        serve,
    )
    .await;
    let client = HttpsClient::new(
        running.addr,
        running.ca_pem.as_deref().expect("self-signed CA"),
    );
    (running, client)
}

pub async fn start(tls: TlsSource, serve: ServeOptions) -> Running {
    velero_jupyterhub::tls::install_default_provider();
    server::start(Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        ops_listen: "127.0.0.1:0".parse().expect("addr"),
        tls,
        default_claims: ClaimGlobs::parse("claim-*").expect("globs"),
        helper: velero_jupyterhub::policy::helper::HelperOptions::with_image(
            velero_jupyterhub::policy::helper::DEFAULT_IMAGE,
        ),
        velero_namespace: "velero".to_owned(),
        cluster: None,
        serve,
        shutdown_delay: Duration::ZERO,
    })
    .await
    .expect("server starts")
}

#[derive(Clone)]
pub struct HttpsClient {
    pub addr: SocketAddr,
    connector: TlsConnector,
    /// Connect from this loopback address (127.0.0.0/8 all reach the server), to look
    /// like a separate host.
    source: Option<std::net::IpAddr>,
}

impl HttpsClient {
    /// Trusts exactly the CA certificates in `ca_pem`.
    pub fn new(addr: SocketAddr, ca_pem: &str) -> Self {
        Self::with_versions(
            addr,
            ca_pem,
            &[&rustls::version::TLS13, &rustls::version::TLS12],
        )
    }

    pub fn with_versions(
        addr: SocketAddr,
        ca_pem: &str,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA cert");
        }
        let mut config =
            rustls::ClientConfig::builder_with_provider(velero_jupyterhub::tls::provider())
                .with_protocol_versions(versions)
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        // Every connection does a full handshake, so it sees the certificate served now
        // (a resumed session would report the one from the original handshake).
        config.resumption = rustls::client::Resumption::disabled();
        Self {
            addr,
            connector: TlsConnector::from(Arc::new(config)),
            source: None,
        }
    }

    /// The same client, connecting from `source`.
    pub fn with_source(mut self, source: std::net::IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    pub async fn tls_stream(&self) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = connect(self.addr, self.source).await?;
        self.tls_over(tcp).await
    }

    /// A TLS handshake over a connection opened elsewhere.
    pub async fn tls_over(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from("localhost").expect("name");
        self.connector.connect(name, tcp).await
    }

    /// A new keep-alive connection.
    pub async fn connect(&self) -> Result<Conn, String> {
        let tls = self.tls_stream().await.map_err(|e| format!("tls: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Conn { sender })
    }

    /// One request on a fresh connection.
    pub async fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Response, String> {
        self.connect().await?.post(path, content_type, body).await
    }

    pub async fn mutate(&self, body: Vec<u8>) -> Result<Response, String> {
        self.post("/mutate/live", Some("application/json"), body)
            .await
    }

    /// The DER of the leaf certificate the server presents now.
    pub async fn served_certificate(&self) -> Vec<u8> {
        let tls = self.tls_stream().await.expect("tls");
        let (_, session) = tls.get_ref();
        session.peer_certificates().expect("peer certs")[0]
            .as_ref()
            .to_vec()
    }
}

pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn post(
        &mut self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Response, String> {
        let mut req = hyper::Request::post(path).header("host", "localhost");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.send(req).await
    }

    pub async fn send(&mut self, req: hyper::Request<Full<Bytes>>) -> Result<Response, String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("not ready: {e}"))?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// A TCP connection to `addr`, from `source` when given.
pub async fn connect(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// A plain-HTTP GET (the operations port).
pub async fn http_get(addr: SocketAddr, path: &str) -> Response {
    http_get_from(addr, None, path).await
}

/// A plain-HTTP GET from `source` when given (a kubelet probing from its node's address).
pub async fn http_get_from(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    path: &str,
) -> Response {
    try_http_get_from(addr, source, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// A plain-HTTP GET that may fail (a connection refused while the port is full).
pub async fn try_http_get_from(
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    path: &str,
) -> Result<Response, String> {
    let tcp = connect(addr, source)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((status, body))
}
