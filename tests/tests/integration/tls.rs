//! Remote clients: gRPC over TCP with mutual TLS, identified by their certificates. Policy
//! principals match the certificate's SAN URI, SAN DNS name or subject CN, and nothing else:
//! local principals never match a TCP client, and a client without a certificate from the
//! configured CA never gets a request through.

use portcullis_client::{Client, ClientError, TlsOptions, matching};
use portcullis_tests::{
    Broker, BrokerSetup,
    client::{OpenMode, Status},
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

const POLICY: &str = r#"
[[principal]]
name = "local"

[[principal]]
name = "app-a"
tls_san_uri = ["spiffe://portcullis.test/app-a"]

[[principal]]
name = "ops-console"
tls_subject_cn = ["ops-console"]

[[principal]]
name = "fleet"
tls_san_dns = ["node1.fleet.test"]
not = { tls_subject_cn = ["revoked-node"] }

[[rule]]
id = "local-use"
effect = "allow"
principals = ["local"]
service = { class = "SampleDevice" }
methods = ["*"]

[[rule]]
id = "app-a-add"
effect = "allow"
principals = ["app-a"]
service = { class = "SampleDevice" }
methods = ["add"]

[[rule]]
id = "ops-echo"
effect = "allow"
principals = ["ops-console", "fleet"]
service = { class = "SampleDevice" }
methods = ["echo"]
"#;

/// A CA, the broker's certificate, and client certificates signed by it.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "portcullis test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Pki {
            dir: portcullis_tests::tempdir(),
            ca,
        };
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        let (cert, key) = pki.issue(&["broker.test"], &[], None, ExtendedKeyUsagePurpose::ServerAuth);
        std::fs::write(pki.path("broker.pem"), cert).unwrap();
        std::fs::write(pki.path("broker.key"), key).unwrap();
        pki
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A certificate (PEM) and key (PEM) with these SANs and CN.
    fn issue(&self, dns: &[&str], uris: &[&str], cn: Option<&str>, usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params = CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.to_string().try_into().unwrap()));
        }
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn client(&self, dns: &[&str], uris: &[&str], cn: Option<&str>) -> TlsOptions {
        let (cert, key) = self.issue(dns, uris, cn, ExtendedKeyUsagePurpose::ClientAuth);
        TlsOptions {
            ca_pem: self.ca.pem().into_bytes(),
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
            server_name: "broker.test".into(),
        }
    }

    fn config(&self) -> String {
        format!(
            "[[device]]\nname = \"sample0\"\ndriver = \"sample\"\n\n[tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            self.path("broker.pem"),
            self.path("broker.key"),
            self.path("ca.pem")
        )
    }
}

fn addr(broker: &Broker) -> String {
    std::fs::read_to_string(broker.run_dir().join("tls.addr")).unwrap()
}

/// Calls `method` on sample0 over a fresh TLS session; the refusal's status and rule if refused.
async fn call(addr: &str, tls: &TlsOptions, method: &str) -> Result<Vec<u64>, (Status, Option<String>)> {
    let client = Client::connect_tls(addr, tls).await.unwrap();
    let session = client.session().await.unwrap();
    let info = session.find_one(matching::by_name("sample0")).await.unwrap();
    let refused = |e: ClientError| match e {
        ClientError::Refused { status, rule, .. } => (status, rule),
        other => panic!("{method}: {other}"),
    };
    let uc = session.open(info.id, OpenMode::Shared).await.map_err(refused)?;
    let (scalars, input): (&[u64], &[u8]) = if method == "add" { (&[2, 3], &[]) } else { (&[], b"hi") };
    let reply = session.call_named(&uc, method, scalars, input).await.map_err(refused)?;
    Ok(reply.scalars)
}

#[tokio::test]
async fn tls_clients_are_known_by_their_certificates_only() {
    let pki = Pki::new();
    let config = pki.config();
    let broker = Broker::with(BrokerSetup {
        config: Some(&config),
        policy: Some(POLICY),
        ..BrokerSetup::default()
    });
    let addr = addr(&broker);

    // SAN URI app-a: add, and only add.
    let app_a = pki.client(&[], &["spiffe://portcullis.test/app-a"], Some("app-a"));
    assert_eq!(call(&addr, &app_a, "add").await, Ok(vec![5]));
    assert_eq!(
        call(&addr, &app_a, "echo").await,
        Err((Status::NotPrivileged, Some("default deny".into())))
    );
    // CN ops-console: echo, not add.
    let ops = pki.client(&[], &[], Some("ops-console"));
    assert!(call(&addr, &ops, "echo").await.is_ok());
    assert_eq!(
        call(&addr, &ops, "add").await,
        Err((Status::NotPrivileged, Some("default deny".into())))
    );
    // SAN DNS, with a `not` on the CN.
    let node = pki.client(&["node1.fleet.test"], &[], Some("node1"));
    assert!(call(&addr, &node, "echo").await.is_ok());
    let revoked = pki.client(&["node1.fleet.test"], &[], Some("revoked-node"));
    assert!(call(&addr, &revoked, "echo").await.is_err());

    // A valid certificate naming nobody the policy knows: the local principal (no attributes,
    // "every local task") does not match it, so the service cannot even be opened.
    let stranger = pki.client(&[], &["spiffe://portcullis.test/other"], Some("other"));
    let refused = call(&addr, &stranger, "echo").await.unwrap_err();
    assert_eq!(refused.1.as_deref(), Some("default deny"), "{refused:?}");

    // A certificate from another CA: the handshake fails; nothing is served.
    let rogue = Pki::new().client(&[], &["spiffe://portcullis.test/app-a"], Some("app-a"));
    let rogue = TlsOptions {
        ca_pem: app_a.ca_pem.clone(),
        ..rogue
    };
    match Client::connect_tls(&addr, &rogue).await {
        Err(_) => {}
        Ok(client) => assert!(client.session().await.is_err(), "a rogue certificate was served"),
    }

    // The administrative reload is for local administrators only.
    let client = Client::connect_tls(&addr, &app_a).await.unwrap();
    assert!(client.reload_policy().await.is_err());

    // Local clients are unaffected.
    let (session, sample) = broker.open("sample0", OpenMode::Shared).await;
    let reply = session.call_named(&sample, "add", &[40, 2], &[]).await.unwrap();
    assert_eq!(reply.scalars, vec![42]);
    assert!(broker.log().contains("serving gRPC over TCP with mutual TLS"));
}

#[test]
fn policy_explain_and_test_speak_of_tls_clients() {
    let dir = portcullis_tests::tempdir();
    let path = dir.path().join("p.toml");
    std::fs::write(&path, POLICY).unwrap();
    let out = std::process::Command::new(portcullis_tests::bin())
        .args(["policy", "explain", "--policy", path.to_str().unwrap()])
        .args([
            "--principal",
            "tls_san_uri=spiffe://portcullis.test/app-a",
            "--service",
            "class=SampleDevice,name=sample0",
            "--method",
            "add",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("app-a-add"), "{text}");
    assert!(
        text.contains("a principal of local tasks; the task is a TLS client"),
        "{text}"
    );
    // Mixing certificate and local attributes in one principal is an error.
    std::fs::write(
        &path,
        "[[principal]]\nname = \"x\"\nuid = [0]\ntls_subject_cn = [\"y\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(portcullis_tests::bin())
        .args(["policy", "check", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("mixes TLS certificate attributes with local ones"),
        "{text}"
    );
}

#[tokio::test]
async fn tls_connections_that_stall_their_handshake_are_closed() {
    let pki = Pki::new();
    let config = format!("{}\n[limits]\nhandshake_timeout_ms = 200\n", pki.config());
    let broker = Broker::with(BrokerSetup {
        config: Some(&config),
        policy: Some(POLICY),
        ..BrokerSetup::default()
    });
    let addr = addr(&broker);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // One sends nothing at all; one starts a ClientHello and stops.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
    for stream in [&mut silent, &mut stalled] {
        let mut buf = [0u8; 64];
        // The broker closes it (EOF, or a reset after an alert); the bound is only on a hang.
        let read = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the broker kept a stalled TLS connection open");
    }
    assert!(
        broker
            .log()
            .contains("TLS handshake and HTTP/2 preface not done within the handshake timeout")
    );
    // A real client is served.
    let app_a = pki.client(&[], &["spiffe://portcullis.test/app-a"], Some("app-a"));
    assert_eq!(call(&addr, &app_a, "add").await, Ok(vec![5]));
}
