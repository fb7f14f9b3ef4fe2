//! Frames ↔ session commands, replies and events.

use std::os::fd::OwnedFd;

use portcullis_proto::{
    Status,
    frame::{Body, Event, Request, ResponseFrame, ServerFrame, ServiceSummary},
};

use crate::{
    registry::{Matching, OpenMode, Service, ServiceId},
    session::{Command, CoreEvent, Refusal, Reply, SessionEvent},
};

/// The session command of a request; `None` for requests the transport itself answers
/// (`EnableRing`).
pub(super) fn command(request: Request) -> Option<Command> {
    Some(match request {
        Request::FindServices { class, name } => Command::FindServices(Matching {
            class: Some(class).filter(|c| !c.is_empty()),
            name: Some(name).filter(|n| !n.is_empty()),
            properties: Default::default(),
        }),
        Request::Open { service, exclusive } => Command::Open {
            service: ServiceId(service),
            mode: if exclusive {
                OpenMode::Exclusive
            } else {
                OpenMode::Shared
            },
        },
        Request::Close { handle } => Command::Close { handle },
        Request::Call {
            handle,
            selector,
            scalars,
            struct_in,
            struct_out_len,
        } => Command::Call {
            handle,
            selector,
            scalars,
            struct_in,
            struct_out_len,
        },
        Request::Subscribe { services } => Command::Subscribe(services.into_iter().map(ServiceId).collect()),
        Request::WatchMatching {
            class,
            name,
            properties,
        } => Command::WatchMatching(Matching {
            class: Some(class).filter(|c| !c.is_empty()),
            name: Some(name).filter(|n| !n.is_empty()),
            properties: properties
                .into_iter()
                .map(|(k, v)| (k, portcullis_proto::property::PropValue::Text(v)))
                .collect(),
        }),
        Request::MapMemory { handle, memory_type } => Command::MapMemory { handle, memory_type },
        Request::EnableRing { .. } => return None,
    })
}

fn summary(service: &Service) -> ServiceSummary {
    ServiceSummary {
        id: service.id().0,
        parent: service.parent().map_or(0, |p| p.0),
        name: service.name().to_string(),
        class: service.class().to_string(),
    }
}

/// The response frame, and the descriptor that travels with it (memory mappings).
pub(super) fn response(id: u64, result: Result<Reply, Refusal>) -> (ServerFrame, Option<OwnedFd>) {
    let mut fd = None;
    let frame = match result {
        Ok(reply) => {
            let body = match reply {
                Reply::Mapped {
                    fd: mapped,
                    memory_type,
                } => {
                    fd = Some(mapped);
                    Body::Mapped {
                        memory_type: memory_type.id,
                        size: memory_type.size,
                        writable: memory_type.writable,
                    }
                }
                Reply::Found(services) => Body::Found(services.iter().map(|s| summary(s)).collect()),
                Reply::Opened { handle, service, .. } => Body::Opened {
                    handle,
                    service: service.id().0,
                },
                Reply::Called(out) => Body::Call {
                    scalars: out.scalars,
                    struct_out: out.struct_out,
                },
                Reply::Done => Body::None,
            };
            ResponseFrame {
                id,
                status: Status::Success.code(),
                message: String::new(),
                rule: String::new(),
                body,
            }
        }
        Err(refusal) => {
            tracing::debug!(id, %refusal, "request refused");
            ResponseFrame {
                id,
                status: refusal.status.code(),
                message: refusal.message,
                rule: refusal.rule.unwrap_or_default(),
                body: Body::None,
            }
        }
    };
    (ServerFrame::Response(frame), fd)
}

/// The frame of an event; `None` for events that only concern the broker itself.
pub(super) fn event(event: SessionEvent) -> Option<ServerFrame> {
    Some(ServerFrame::Event(match event {
        SessionEvent::Core(CoreEvent::PolicyReloaded { .. }) => return None,
        SessionEvent::Core(CoreEvent::Published(service)) => Event::Published(summary(&service)),
        SessionEvent::Core(CoreEvent::Terminated { id, name }) => Event::Terminated { service: id.0, name },
        SessionEvent::Core(CoreEvent::Notice { service, notice }) => Event::Notification {
            service: service.id().0,
            kind: notice.kind.to_string(),
            value: notice.value,
            detail: notice.detail,
        },
        SessionEvent::UserClientClosed { handle, status, reason } => Event::UserClientClosed {
            handle,
            status: status.code(),
            reason,
        },
        SessionEvent::Lost(count) => Event::Lost { count },
        SessionEvent::Core(CoreEvent::WillSleep) => Event::WillSleep,
        SessionEvent::Core(CoreEvent::HasWoken) => Event::HasWoken,
    }))
}
