//! The simulator: drives device-side [`Registration`] state machines against a service-side
//! [`Provisioner`] on a virtual clock, with a fixed one-way network delay. Everything is in
//! process and deterministic apart from the random operation ids and etags, and the jitter of
//! the devices' waits after 429/5xx replies (it comes from [`Simulator::crypto`]; give it a
//! provider with fixed random bytes to fix those waits too).

use std::sync::Arc;
use std::time::Duration;

use zerotouch_engine::attestation::Credential;
use zerotouch_engine::crypto::{CryptoProvider, RingCrypto};
use zerotouch_engine::hub::HubRegistry;
use zerotouch_engine::provisioner::{OperationStatusRequest, Provisioner, RegisterRequest, Response};
use zerotouch_engine::registration::{
    Registration, RegistrationConfig, RegistrationEvent, ServiceResponse, Transmit,
};
use zerotouch_engine::store::ProvisioningStore;
use zerotouch_proto::Timestamp;

/// A simulated world: one provisioning service, its hubs, and a virtual clock.
pub struct Simulator<S, H> {
    /// The service under test.
    pub provisioner: Provisioner<S>,
    /// The hubs the service provisions into.
    pub hubs: H,
    /// Virtual now.
    pub now: Timestamp,
    /// One-way network delay added to every request and reply.
    pub delay: Duration,
    /// Crypto for devices.
    pub crypto: Arc<dyn CryptoProvider>,
    /// Requests the service handled (register + polls), for assertions.
    pub requests: usize,
}

/// Virtual start time of every simulation: 2026-01-01T00:00:00Z.
pub const START: Timestamp = Timestamp::from_unix_secs(1_767_225_600);

impl<S: ProvisioningStore, H: HubRegistry> Simulator<S, H> {
    /// A simulator starting at [`START`] with a 20 ms network delay.
    pub fn new(provisioner: Provisioner<S>, hubs: H) -> Self {
        Self {
            provisioner,
            hubs,
            now: START,
            delay: Duration::from_millis(20),
            crypto: Arc::new(RingCrypto::new()),
            requests: 0,
        }
    }

    /// Advances the virtual clock.
    pub fn advance(&mut self, by: Duration) {
        self.now = self.now + by;
    }

    /// Runs one device's registration to its outcome. `tls_chain` is what the device presents in
    /// the TLS handshake (X.509 devices); SAS tokens come from the state machine itself.
    ///
    /// # Panics
    /// When the machine neither finishes nor asks for a timer (a bug in the state machine), or
    /// after 10,000 steps.
    pub fn register(
        &mut self,
        config: RegistrationConfig,
        tls_chain: Option<Vec<Vec<u8>>>,
    ) -> RegistrationEvent {
        let id_scope = config.id_scope.to_string();
        let registration_id = config.registration_id.to_string();
        let api_version = config.api_version.clone();
        let mut machine = Registration::new(config, self.crypto.clone());
        for _ in 0..10_000 {
            if let Some(event) = machine.poll_event() {
                return event;
            }
            if let Some(transmit) = machine.poll_transmit(self.now) {
                self.advance(self.delay);
                let credential = |authorization: Option<String>| match (&tls_chain, authorization) {
                    (_, Some(token)) => Credential::Sas(token),
                    (Some(chain), None) => Credential::X509(chain.clone()),
                    (None, None) => Credential::None,
                };
                let response: Response = match transmit {
                    Transmit::Register { body, authorization } => self.provisioner.handle_register(
                        self.now,
                        RegisterRequest {
                            id_scope: id_scope.clone(),
                            registration_id: registration_id.clone(),
                            body,
                            credential: credential(authorization),
                            api_version: Some(api_version.clone()),
                        },
                        &mut self.hubs,
                    ),
                    Transmit::PollStatus { operation_id, authorization } => {
                        self.provisioner.handle_operation_status(
                            self.now,
                            OperationStatusRequest {
                                id_scope: id_scope.clone(),
                                registration_id: registration_id.clone(),
                                operation_id: operation_id.to_string(),
                                credential: credential(authorization),
                            },
                        )
                    }
                };
                self.requests += 1;
                self.advance(self.delay);
                machine.handle_response(
                    self.now,
                    ServiceResponse {
                        status: response.status,
                        retry_after: response.retry_after.map(|s| Duration::from_secs(u64::from(s))),
                        body: response.body_json(),
                    },
                );
                continue;
            }
            match machine.poll_timeout() {
                Some(deadline) => {
                    if deadline > self.now {
                        self.now = deadline;
                    }
                    machine.handle_timeout(self.now);
                }
                None => panic!("registration state machine is stuck: no event, no transmit, no timer"),
            }
        }
        panic!("registration did not finish within 10,000 steps")
    }
}
