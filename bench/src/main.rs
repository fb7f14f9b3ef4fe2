//! Portcullis benchmarks, side by side with the peers a user would pick instead.
//!
//! `grpc-add`: the `add` round trip over the broker's gRPC session on a Unix socket, against a
//! bare tonic echo server on a Unix socket that answers the same bidirectional stream with a
//! response of the same shape and size, doing no policy check and no dispatch. Both servers run
//! in one runtime of this process, both clients run the same code, and the contenders take
//! turns in rounds so that drift in machine load hits both alike.
//!
//! usage: portcullis-bench [--quick] [--rounds N] [--iters N]

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_debug_implementations
)]

use std::{
    path::Path,
    pin::Pin,
    time::{Duration, Instant},
};

use portcullis_broker::{config::Config, server, transport::grpc};
use portcullis_proto::pb::{self, client_message::Request, server_message::Kind};
use tokio::{net::UnixListener, sync::mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod echo_pb {
    include!("generated/portcullis.bench.rs");
}

use echo_pb::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
};

/// The bare peer: answers each message with a response of the same shape as the broker's.
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ServerMessage, tonic::Status>> + Send>>;

    async fn session(
        &self,
        req: tonic::Request<tonic::Streaming<pb::ClientMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let scalars = match m.request {
                    Some(Request::Call(c)) => vec![c.scalars.iter().fold(0u64, |a, b| a.wrapping_add(*b))],
                    _ => vec![],
                };
                let response = pb::Response {
                    request_id: m.request_id,
                    result: Some(pb::response::Result::Call(pb::CallResult {
                        scalars,
                        struct_out: vec![],
                    })),
                    ..Default::default()
                };
                if tx
                    .send(Ok(pb::ServerMessage {
                        kind: Some(Kind::Response(response)),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One ping-pong stream: send a message, wait for its response.
struct PingPong {
    tx: mpsc::Sender<pb::ClientMessage>,
    inbound: tonic::Streaming<pb::ServerMessage>,
    next_id: u64,
}

impl PingPong {
    async fn round_trip(&mut self, request: Request) -> pb::Response {
        self.next_id += 1;
        self.tx
            .send(pb::ClientMessage {
                request_id: self.next_id,
                request: Some(request),
            })
            .await
            .unwrap();
        loop {
            if let Some(Kind::Response(r)) = self.inbound.message().await.unwrap().unwrap().kind {
                assert_eq!(r.request_id, self.next_id);
                return r;
            }
        }
    }
}

async fn broker_stream(socket: &Path) -> (PingPong, u64) {
    let channel = portcullis_client::uds_channel(socket).await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    let inbound = pb::broker_client::BrokerClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut s = PingPong {
        tx,
        inbound,
        next_id: 0,
    };
    let found = s
        .round_trip(Request::FindServices(pb::FindServices {
            matching: Some(pb::Matching {
                name: "sample0".into(),
                ..Default::default()
            }),
        }))
        .await;
    let Some(pb::response::Result::Found(found)) = found.result else {
        panic!("find: {found:?}")
    };
    let opened = s
        .round_trip(Request::OpenUserClient(pb::OpenUserClient {
            service_id: found.services[0].id,
            mode: pb::OpenMode::Shared.into(),
        }))
        .await;
    let Some(pb::response::Result::Opened(opened)) = opened.result else {
        panic!("open: {opened:?}")
    };
    (s, opened.handle)
}

async fn echo_stream(socket: &Path) -> PingPong {
    let channel = portcullis_client::uds_channel(socket).await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    let inbound = EchoClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    PingPong {
        tx,
        inbound,
        next_id: 0,
    }
}

fn add(handle: u64, i: u64) -> Request {
    Request::Call(pb::CallMethod {
        handle,
        selector: 0,
        scalars: vec![i, 1],
        struct_in: vec![],
        struct_out_len: 0,
    })
}

async fn measure(s: &mut PingPong, handle: u64, iters: usize, samples: &mut Vec<Duration>) {
    for i in 0..iters {
        let start = Instant::now();
        let r = s.round_trip(add(handle, i as u64)).await;
        samples.push(start.elapsed());
        let Some(pb::response::Result::Call(out)) = r.result else {
            panic!("call: {r:?}")
        };
        assert_eq!(out.scalars, [i as u64 + 1]);
    }
}

struct Summary {
    p50: Duration,
    p99: Duration,
    p999: Duration,
    mean: Duration,
}

fn summarize(samples: &mut [Duration]) -> Summary {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let total: Duration = samples.iter().sum();
    Summary {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        mean: total / samples.len() as u32,
    }
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let value = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = value("--rounds", if quick { 3 } else { 10 });
    let iters = value("--iters", if quick { 1_000 } else { 5_000 });

    let dir = tempfile::tempdir().unwrap();
    let broker_socket = dir.path().join("broker.sock");
    let echo_socket = dir.path().join("echo.sock");

    // Both servers share one runtime (the broker's default: a worker per core).
    let servers = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    servers.block_on(async {
        let core = server::build_core(&Config::load(None).unwrap(), None).unwrap();
        let listener = grpc::bind(&broker_socket).await.unwrap();
        tokio::spawn(grpc::serve(core, listener, std::future::pending()));
        let echo = UnixListener::bind(&echo_socket).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(EchoService))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(echo)),
        );
    });

    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (broker, echo) = client.block_on(async {
        let (mut broker, handle) = broker_stream(&broker_socket).await;
        let mut echo = echo_stream(&echo_socket).await;
        let (mut b, mut e) = (Vec::new(), Vec::new());
        measure(&mut broker, handle, iters, &mut Vec::new()).await; // warm-up
        measure(&mut echo, 0, iters, &mut Vec::new()).await;
        for _ in 0..rounds {
            measure(&mut broker, handle, iters, &mut b).await;
            measure(&mut echo, 0, iters, &mut e).await;
        }
        (summarize(&mut b), summarize(&mut e))
    });

    println!("grpc-add: {rounds} rounds x {iters} sequential round trips each, contenders alternating");
    println!();
    println!("| contender | p50 µs | p99 µs | p99.9 µs | mean µs | calls/s (1 stream) |");
    println!("|---|---|---|---|---|---|");
    for (name, s) in [
        ("broker `add` (gRPC session, UDS; policy + dispatch)", &broker),
        ("bare tonic echo (same messages, UDS)", &echo),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} | {:.0} |",
            us(s.p50),
            us(s.p99),
            us(s.p999),
            us(s.mean),
            1.0 / s.mean.as_secs_f64()
        );
    }
    println!();
    println!(
        "broker / echo: p50 {:.2}x, mean {:.2}x, p99 {:.2}x (target: <= 1.3x)",
        broker.p50.as_secs_f64() / echo.p50.as_secs_f64(),
        broker.mean.as_secs_f64() / echo.mean.as_secs_f64(),
        broker.p99.as_secs_f64() / echo.p99.as_secs_f64()
    );
}
