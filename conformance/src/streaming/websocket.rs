//! The WebSocket connection: the upgrade with a channel subprotocol and the
//! reader and writer tasks that route channel messages.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::connection::{Connection, HttpTarget, LinkState, Outbound, bounded};
use super::{CONNECT_TIMEOUT, REMOTE_COMMAND_V5, StreamError};

/// A WebSocket connection with its inbound channels not yet handed out.
pub(super) struct WsConn {
    pub(super) conn: Arc<Connection>,
    messages: mpsc::UnboundedSender<Message>,
    pub(super) inbound: HashMap<u8, mpsc::UnboundedReceiver<Bytes>>,
}

impl WsConn {
    /// Connects to `url` (plus `query`, if not empty) offering `protocols`,
    /// with an input channel for each of `channels`.
    pub(super) async fn connect(
        url: &str,
        protocols: &[&str],
        query: &str,
        channels: impl IntoIterator<Item = u8>,
    ) -> Result<WsConn, StreamError> {
        let target = HttpTarget::parse(url)?;
        let separator = if target.path.contains('?') { '&' } else { '?' };
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("{separator}{query}")
        };
        let ws_url = format!("ws://{}{}{query}", target.host, target.path);
        let websocket = |e| StreamError::WebSocket(Box::new(e));
        let mut request = ws_url.as_str().into_client_request().map_err(websocket)?;
        let offered = protocols
            .join(", ")
            .parse()
            .expect("protocol names are valid header values");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", offered);

        let waiting_for = format!("the WebSocket upgrade of {url}");
        let connected = bounded(
            CONNECT_TIMEOUT,
            waiting_for,
            tokio_tungstenite::connect_async(request),
        )
        .await?;
        let (stream, response) = connected.map_err(|e| match e {
            tungstenite::Error::Http(response) => StreamError::HttpStatus {
                code: response.status().as_u16(),
                body: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned(),
            },
            e => websocket(e),
        })?;
        let chosen = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok());
        let protocol = match chosen {
            Some(chosen) if protocols.contains(&chosen) => chosen.to_owned(),
            _ => {
                let reason = format!("the server chose protocol {chosen:?}, offered {protocols:?}");
                return Err(StreamError::Upgrade { reason });
            }
        };

        let (mut inputs, mut inbound) = (HashMap::new(), HashMap::new());
        for channel in channels {
            let (tx, rx) = mpsc::unbounded_channel();
            inputs.insert(channel, tx);
            inbound.insert(channel, rx);
        }
        let (sink, source) = stream.split();
        let (messages, outgoing) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(LinkState::Open);
        let can_close = protocol == REMOTE_COMMAND_V5;
        let reader = tokio::spawn(ws_reader(source, inputs, can_close, state_tx));
        let writer = tokio::spawn(ws_writer(sink, outgoing));
        let conn = Arc::new(Connection {
            protocol,
            state,
            tasks: vec![reader, writer],
        });
        Ok(WsConn {
            conn,
            messages,
            inbound,
        })
    }

    pub(super) fn outbound(&self, channel: u8) -> Outbound {
        Outbound::WebSocket {
            messages: self.messages.clone(),
            channel,
        }
    }
}

async fn ws_writer(
    mut sink: impl futures::Sink<Message> + Unpin,
    mut messages: mpsc::UnboundedReceiver<Message>,
) {
    while let Some(message) = messages.recv().await {
        if sink.send(message).await.is_err() {
            return;
        }
    }
}

/// Reads messages until the connection ends and routes each payload by its
/// channel byte. Empty payloads (sent when a channel opens) are skipped; on
/// v5, `[255, channel]` ends that channel's input.
async fn ws_reader(
    mut source: impl futures::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
    mut inputs: HashMap<u8, mpsc::UnboundedSender<Bytes>>,
    can_close: bool,
    state: watch::Sender<LinkState>,
) {
    while let Some(Ok(message)) = source.next().await {
        let mut payload = match message {
            Message::Binary(payload) => payload,
            Message::Close(_) => break,
            _ => continue,
        };
        let Some(&channel) = payload.first() else {
            continue;
        };
        payload.advance(1);
        if can_close && channel == 255 {
            if let Some(closed) = payload.first() {
                inputs.remove(closed);
            }
            continue;
        }
        if let (Some(input), false) = (inputs.get(&channel), payload.is_empty()) {
            let _ = input.send(payload);
        }
    }
    drop(inputs);
    let _ = state.send(LinkState::Closed);
}
