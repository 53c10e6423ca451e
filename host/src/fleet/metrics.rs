//! Prometheus metrics (`GET /metrics` on the admin listener), in the text
//! exposition format written by the `prometheus-client` crate.
//!
//! Two kinds of figures:
//! * counted by this process as things happen: bytes read and written on
//!   client connections, and every swap's pause as a histogram by kind and
//!   outcome (a host upgrade starts them again from zero in the new
//!   process, which Prometheus reads as a counter reset);
//! * read from the service's status at each scrape: connections, events,
//!   traps, recoveries, timers, journal and snapshot sizes, generation.
//!
//! Every name starts with `wasmhost_`; the table in the README lists them.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::State;
use crate::service::{StatusReport, SwapRecord};

/// Bytes read from client connections by this process.
static BYTES_IN: AtomicU64 = AtomicU64::new(0);
/// Bytes written to client connections by this process.
static BYTES_OUT: AtomicU64 = AtomicU64::new(0);

/// Counts bytes read from a client (the connection read loop).
pub fn read(n: usize) {
    BYTES_IN.fetch_add(n as u64, Ordering::Relaxed);
}

/// Counts bytes written to a client.
pub fn written(n: usize) {
    BYTES_OUT.fetch_add(n as u64, Ordering::Relaxed);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SwapLabels {
    kind: String,
    outcome: String,
}

/// Pause buckets, in seconds: 50 µs to about 3 s.
fn pause_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        50e-6, 3.0, 11,
    ))
}

type PauseFamily = Family<SwapLabels, Histogram, fn() -> Histogram>;

static SWAPS: LazyLock<PauseFamily> =
    LazyLock::new(|| Family::new_with_constructor(pause_histogram));

/// Records a swap, upgrade or migration as the service keeps it in its
/// history.
pub fn swap_recorded(record: &SwapRecord) {
    let outcome = match record.outcome.as_str() {
        "committed" => "committed",
        _ => "aborted",
    };
    SWAPS
        .get_or_create(&SwapLabels {
            kind: record.kind.clone(),
            outcome: outcome.into(),
        })
        .observe(record.pause_us as f64 / 1e6);
}

/// What one scrape reads besides the process's own counters.
#[derive(Debug)]
struct Snapshot {
    state: State,
    status: Option<StatusReport>,
    relaying: usize,
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64| {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
        };
        let counter = |enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64| {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
        };
        let is = |s: State| i64::from(self.state == s);
        gauge(
            &mut enc,
            "ready",
            "1 when serving and accepting (what /readyz says)",
            is(State::Ready),
        )?;
        gauge(
            &mut enc,
            "draining",
            "1 while draining (wasmhost drain)",
            is(State::Draining),
        )?;
        gauge(
            &mut enc,
            "handing_off",
            "1 while a host upgrade or migration moves the service",
            is(State::HandingOff),
        )?;
        gauge(
            &mut enc,
            "service",
            "1 when this process has a service",
            i64::from(self.status.is_some()),
        )?;
        gauge(
            &mut enc,
            "relayed_connections",
            "connections relayed for a host the service moved to (migrate --relay)",
            self.relaying as i64,
        )?;
        counter(
            &mut enc,
            "received_bytes",
            "bytes read from client connections by this process",
            BYTES_IN.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "sent_bytes",
            "bytes written to client connections by this process",
            BYTES_OUT.load(Ordering::Relaxed),
        )?;
        if let Some(r) = crate::standby::status() {
            gauge(
                &mut enc,
                "standby_connected",
                "1 while the replication link (primary or standby side) is up",
                i64::from(r.connected),
            )?;
            gauge(
                &mut enc,
                "standby_sync",
                "1 while replies wait for the standby (--sync-standby, not degraded)",
                i64::from(r.sync),
            )?;
            gauge(
                &mut enc,
                "standby_lag_bytes",
                "journal bytes shipped and not yet acknowledged by the standby",
                r.lag_bytes as i64,
            )?;
            gauge(
                &mut enc,
                "standby_lag_milliseconds",
                "primary: age of the oldest unacknowledged append; standby: time since it                  last had the primary's head (milliseconds)",
                r.lag_ms as i64,
            )?;
            gauge(
                &mut enc,
                "epoch",
                "this host's epoch (raised by every promotion)",
                r.epoch as i64,
            )?;
        }
        let Some(s) = &self.status else {
            return Ok(());
        };
        gauge(
            &mut enc,
            "connections",
            "open client connections",
            s.connections as i64,
        )?;
        counter(
            &mut enc,
            "connections_accepted",
            "connections the service has had, across swaps and upgrades",
            s.connections_total,
        )?;
        counter(
            &mut enc,
            "events",
            "events delivered to the guest",
            s.events,
        )?;
        counter(&mut enc, "traps", "guest traps", s.traps)?;
        counter(
            &mut enc,
            "recoveries",
            "traps rebuilt from the snapshot and journal, the state kept",
            s.durable.recoveries,
        )?;
        gauge(&mut enc, "timers", "armed guest timers", s.timers as i64)?;
        gauge(
            &mut enc,
            "generation",
            "the running code's generation",
            s.generation as i64,
        )?;
        gauge(
            &mut enc,
            "journal_bytes",
            "event journal size since the last snapshot",
            s.durable.journal_bytes as i64,
        )?;
        gauge(
            &mut enc,
            "journal_events",
            "journaled events since the last snapshot",
            s.durable.journal_events as i64,
        )?;
        gauge(
            &mut enc,
            "snapshot_bytes",
            "size of the state a rebuild starts from",
            s.durable.snapshot_bytes as i64,
        )?;
        counter(
            &mut enc,
            "snapshots",
            "snapshots taken by this process",
            s.durable.snapshots,
        )?;
        Ok(())
    }
}

/// The text a scrape returns.
pub fn render(state: State, status: Option<StatusReport>) -> String {
    let mut registry = Registry::with_prefix("wasmhost");
    registry.register(
        "swap_pause_seconds",
        "how long each swap, upgrade or migration paused the service, by kind and outcome",
        SWAPS.clone(),
    );
    registry.register_collector(Box::new(Snapshot {
        state,
        status,
        relaying: crate::migrate::relay::relaying(),
    }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}
