//! The MQTT and MQTT-over-WebSockets link of the device client (rumqttc, our rustls config).

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zerotouch_engine::registration::{ServiceResponse, Transmit};
use zerotouch_proto::mqtt::{ConnectUsername, DeviceRequest, ResponseTopic, POLL_PAYLOAD, SUBSCRIBE_FILTER};

use super::{ClientError, Link, ProvisioningClient, Transport, USER_AGENT, WEBSOCKET_PATH};

/// Keep-alive of the MQTT session (Python's value).
const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Largest reply accepted: DPS caps messages at 96 KB.
const MAX_PACKET: usize = 128 * 1024;

/// How long a polite DISCONNECT may take before the connection is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What the event-loop task reports to the link.
enum Inbound {
    Connected,
    Subscribed(bool),
    Reply { rid: String, response: ServiceResponse },
    Closed(ClientError),
}

/// A connected, subscribed MQTT session of one registration.
pub(crate) struct MqttLink {
    client: AsyncClient,
    inbound: mpsc::UnboundedReceiver<Inbound>,
    task: JoinHandle<()>,
    next_rid: u64,
    awaited_rid: Option<String>,
}

impl MqttLink {
    /// Connects with the credentials of `first` (the register transmit) and subscribes to the
    /// reply topics.
    pub(crate) async fn connect(client: &ProvisioningClient, first: &Transmit) -> Result<Self, ClientError> {
        let config = &client.config;
        let password = match first {
            Transmit::Register { authorization, .. } | Transmit::PollStatus { authorization, .. } => {
                authorization.clone().unwrap_or_default()
            }
        };
        let username = ConnectUsername {
            id_scope: config.id_scope.clone(),
            registration_id: config.registration_id.clone(),
            api_version: config.api_version.clone(),
            client_version: Some(USER_AGENT.to_owned()),
        };
        let client_id = config.registration_id.as_str().to_owned();
        let tls = TlsConfiguration::Rustls(client.tls.clone());
        let mut options = match client.transport {
            Transport::MqttWs => {
                let url = format!("wss://{}{WEBSOCKET_PATH}", client.endpoint.authority());
                let mut o = MqttOptions::new(client_id, url, client.endpoint.port);
                o.set_transport(rumqttc::Transport::wss_with_config(tls));
                o
            }
            Transport::Mqtt | Transport::Https => {
                let mut o = MqttOptions::new(client_id, client.endpoint.host.clone(), client.endpoint.port);
                o.set_transport(rumqttc::Transport::tls_with_config(tls));
                o
            }
        };
        options
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_credentials(username.to_string(), password);
        let (mqtt, mut eventloop) = AsyncClient::new(options, 8);
        // rumqttc gives up connecting after its own 5 s unless told otherwise; the whole
        // handshake is bounded by `connect_timeout` below, so its part may take as long.
        let mut network = eventloop.network_options();
        network.set_connection_timeout(client.connect_timeout.as_secs().max(1).saturating_add(1));
        eventloop.set_network_options(network);
        let (tx, inbound) = mpsc::unbounded_channel();
        let task = tokio::spawn(pump(eventloop, tx, client.endpoint.authority()));
        let mut link = Self { client: mqtt, inbound, task, next_rid: 1, awaited_rid: None };
        match tokio::time::timeout(client.connect_timeout, link.handshake()).await {
            Ok(Ok(())) => Ok(link),
            Ok(Err(e)) => {
                link.task.abort();
                Err(e)
            }
            Err(_) => {
                link.task.abort();
                Err(ClientError::Connection(format!(
                    "no CONNACK and SUBACK from {} within {} s",
                    client.endpoint.authority(),
                    client.connect_timeout.as_secs_f64()
                )))
            }
        }
    }

    async fn handshake(&mut self) -> Result<(), ClientError> {
        self.client.subscribe(SUBSCRIBE_FILTER, QoS::AtLeastOnce).await.map_err(request_failed)?;
        let mut connected = false;
        loop {
            match self.inbound.recv().await {
                Some(Inbound::Connected) => connected = true,
                Some(Inbound::Subscribed(true)) if connected => return Ok(()),
                Some(Inbound::Subscribed(_)) => return Err(ClientError::SubscribeRefused),
                Some(Inbound::Reply { .. }) => {}
                Some(Inbound::Closed(e)) => return Err(e),
                None => return Err(ClientError::Connection("the MQTT event loop stopped".into())),
            }
        }
    }
}

impl Link for MqttLink {
    async fn send(&mut self, transmit: &Transmit) -> Result<(), ClientError> {
        let rid = self.next_rid.to_string();
        self.next_rid += 1;
        let (topic, payload) = match transmit {
            Transmit::Register { body, .. } => {
                let payload = serde_json::to_vec(body)
                    .map_err(|e| ClientError::Connection(format!("cannot encode the register body: {e}")))?;
                (DeviceRequest::Register { rid: rid.clone() }, payload)
            }
            Transmit::PollStatus { operation_id, .. } => (
                DeviceRequest::PollStatus { rid: rid.clone(), operation_id: operation_id.to_string() },
                POLL_PAYLOAD.as_bytes().to_vec(),
            ),
        };
        self.client
            .publish(topic.to_string(), QoS::AtLeastOnce, false, payload)
            .await
            .map_err(request_failed)?;
        self.awaited_rid = Some(rid);
        Ok(())
    }

    async fn recv(&mut self) -> Result<ServiceResponse, ClientError> {
        loop {
            match self.inbound.recv().await {
                Some(Inbound::Reply { rid, response }) => {
                    // Replies to requests the machine no longer waits for are stale.
                    if self.awaited_rid.as_deref() == Some(rid.as_str()) {
                        self.awaited_rid = None;
                        return Ok(response);
                    }
                }
                Some(Inbound::Connected | Inbound::Subscribed(_)) => {}
                Some(Inbound::Closed(e)) => return Err(e),
                None => return Err(ClientError::Connection("the MQTT event loop stopped".into())),
            }
        }
    }

    async fn close(mut self) {
        // Drop (below) aborts the task if it is still running after the grace period.
        if self.client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(CLOSE_GRACE, &mut self.task).await;
        }
    }
}

impl Drop for MqttLink {
    fn drop(&mut self) {
        // A cancelled register() must not leave the connection running.
        self.task.abort();
    }
}

/// Drives rumqttc's event loop (it connects, sends and acknowledges) and forwards what the link
/// needs. Ends at the first connection error (named with `authority`, the server's host and
/// port): DPS sessions are not resumed.
async fn pump(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Inbound>, authority: String) {
    loop {
        let inbound = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => Inbound::Connected,
            Ok(Event::Incoming(Packet::SubAck(ack))) => Inbound::Subscribed(
                !ack.return_codes.is_empty()
                    && ack.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            ),
            Ok(Event::Incoming(Packet::Publish(publish))) => match ResponseTopic::parse(&publish.topic) {
                Ok(topic) => Inbound::Reply {
                    rid: topic.rid,
                    response: ServiceResponse {
                        status: topic.status,
                        retry_after: topic.retry_after.map(|s| Duration::from_secs(u64::from(s))),
                        body: publish.payload.to_vec(),
                    },
                },
                // Not a DPS reply: nothing waits for it.
                Err(_) => continue,
            },
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(Inbound::Closed(connection_error(e, &authority)));
                return;
            }
        };
        if tx.send(inbound).is_err() {
            return;
        }
    }
}

fn connection_error(e: ConnectionError, authority: &str) -> ClientError {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            let (return_code, reason) = match code {
                ConnectReturnCode::RefusedProtocolVersion => (1, "unacceptable protocol version"),
                ConnectReturnCode::BadClientId => (2, "identifier rejected"),
                ConnectReturnCode::ServiceUnavailable => (3, "server unavailable"),
                ConnectReturnCode::BadUserNamePassword => (4, "bad user name or password"),
                ConnectReturnCode::NotAuthorized => (5, "not authorized"),
                ConnectReturnCode::Success => (0, "accepted"),
            };
            ClientError::ConnectRefused { return_code, reason }
        }
        other => ClientError::Connection(format!("{authority}: {other}")),
    }
}

fn request_failed(e: rumqttc::ClientError) -> ClientError {
    ClientError::Connection(format!("the MQTT event loop stopped: {e}"))
}
