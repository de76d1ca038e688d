//! `GET /v1/events`: the daemon's events as a server-sent event stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper::{Response, StatusCode};
use tokio::sync::{broadcast, mpsc, watch};

use super::ApiBody;
use crate::events::Events;

/// Each daemon event becomes `event:` and `data:` lines, until the client
/// goes away or the daemon stops.
pub fn stream(events: &Events, mut stop: watch::Receiver<bool>) -> Response<ApiBody> {
    let mut rx = events.subscribe();
    let (tx, body_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        // A comment line first, so clients see the stream is open.
        if tx.send(Bytes::from_static(b": fleece events\n\n")).await.is_err() {
            return;
        }
        loop {
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = stop.changed() => return,
            };
            let text = match msg {
                Ok(ev) => format!("event: {}\ndata: {}\n\n", ev.kind, ev.data),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Bytes::from(text)).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(ChannelBody(body_rx).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}
