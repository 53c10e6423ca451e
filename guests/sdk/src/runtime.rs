//! The glue between the component's exports and a [`Service`]: one per
//! instance, driven by [`export_service!`](crate::export_service) (and by
//! [`TestHost`](crate::testing::TestHost) natively).

use crate::state::{Formats, Pending};
use crate::{ConnId, ConnInfo, Input, Service};

/// An empty input buffer keeps at most this much room; more is given back.
const IDLE_CAPACITY: usize = 4096;

pub struct Runtime<S: Service> {
    service: Option<S>,
    inputs: Pending,
    formats: Formats<S>,
}

impl<S: Service> Default for Runtime<S> {
    fn default() -> Self {
        Runtime::new()
    }
}

impl<S: Service> Runtime<S> {
    pub fn new() -> Runtime<S> {
        Runtime {
            service: None,
            inputs: Pending::new(),
            formats: S::formats(),
        }
    }

    fn parts(&mut self) -> (&mut S, &mut Pending) {
        let service = self
            .service
            .as_mut()
            .expect("an event arrived before `init` or `import-state`");
        (service, &mut self.inputs)
    }

    pub fn service(&self) -> Option<&S> {
        self.service.as_ref()
    }

    pub fn service_mut(&mut self) -> Option<&mut S> {
        self.service.as_mut()
    }

    pub fn pending(&self) -> &Pending {
        &self.inputs
    }

    pub fn init(&mut self, config: Vec<(String, String)>) -> Result<(), String> {
        self.service = Some(S::init(config)?);
        self.inputs.clear();
        Ok(())
    }

    pub fn connect(&mut self, conn: &ConnInfo) {
        let (service, inputs) = self.parts();
        inputs.insert(conn.id, Vec::new());
        service.on_connect(conn);
    }

    pub fn data(&mut self, conn: ConnId, data: Vec<u8>) {
        let (service, inputs) = self.parts();
        // A connection that came with a state format that does not carry
        // connections has no buffer yet.
        let buf = inputs.entry(conn).or_default();
        if buf.is_empty() {
            *buf = data;
        } else {
            buf.extend_from_slice(&data);
        }
        let mut input = Input::new(buf);
        service.on_data(conn, &mut input);
        if input.len() > S::MAX_INPUT {
            service.on_overflow(conn, &mut input);
        }
        input.finish();
        if buf.is_empty() && buf.capacity() > IDLE_CAPACITY {
            *buf = Vec::new();
        } else if buf.capacity() > 4 * buf.len().max(IDLE_CAPACITY) {
            buf.shrink_to(2 * buf.len());
        }
    }

    pub fn close(&mut self, conn: ConnId) {
        let (service, inputs) = self.parts();
        service.on_close(conn);
        inputs.remove(&conn);
    }

    pub fn timer(&mut self, token: u64) {
        self.parts().0.on_timer(token);
    }

    pub fn importable(&self) -> Vec<String> {
        self.formats.importable()
    }

    pub fn exportable(&self) -> Vec<String> {
        match &self.service {
            Some(service) => self.formats.exportable(service),
            None => Vec::new(),
        }
    }

    pub fn export(&self, format: &str) -> Result<Vec<u8>, String> {
        let service = self
            .service
            .as_ref()
            .ok_or("nothing to export: the service has not started")?;
        self.formats.export(service, &self.inputs, format)
    }

    pub fn import(&mut self, format: &str, state: Vec<u8>) -> Result<(), String> {
        let (service, inputs) = self.formats.import(format, state)?;
        self.service = Some(service);
        self.inputs = inputs;
        Ok(())
    }
}
