//! The data each wasmtime `Store` carries, and the host side of the
//! `wasmhost:service/host` interface.
//!
//! Host imports never touch sockets or timers directly: each call records an
//! [`Effect`] that the service actor carries out as soon as the guest call
//! returns. That keeps guest calls free of I/O and locks, and it makes a swap
//! transactional: effects recorded by an instance whose import is later
//! rejected are simply dropped.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::event_time::EventTime;
use crate::bindings::LogLevel;
use crate::bindings::wasmhost::service::host;

/// Something a guest asked the host to do during one call.
#[derive(Debug)]
pub enum Effect {
    Send(u64, Vec<u8>),
    Close(u64),
    SetTimer(u64, Duration),
    CancelTimer(u64),
}

/// The data of one generation's `Store`.
pub struct StoreData {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: MeteredLimits,
    pub service: Arc<str>,
    /// Effects recorded by the current call, drained by the actor after it.
    pub effects: Vec<Effect>,
    /// When the current guest call started, and how long it may run.
    pub call_started: Instant,
    pub call_budget: Duration,
    /// Measure the deadline in the thread's CPU time instead of wall time
    /// (a shadow, whose thread waits for idle CPU, and never moves).
    pub cpu_clock: bool,
    /// With `cpu_clock`: the thread's CPU time when the deadline check
    /// first ran in the current call (at most one epoch tick after it began).
    pub cpu_started: Option<Duration>,
}

impl StoreData {
    /// `time` provides the guest's clocks and random bytes, set per call.
    pub fn new(service: Arc<str>, max_memory: usize, time: &EventTime) -> StoreData {
        let mut wasi = wasmtime_wasi::WasiCtxBuilder::new();
        // Nothing is granted: no preopened directories, no environment, no
        // arguments, no sockets, no name lookups.
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .wall_clock(time.wall_clock())
            .monotonic_clock(time.monotonic_clock())
            .secure_random(time.random())
            .insecure_random(time.random())
            .insecure_random_seed(time.insecure_seed())
            .stdout(GuestOutput::new(&service, "stdout"))
            .stderr(GuestOutput::new(&service, "stderr"));
        StoreData {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: MeteredLimits {
                limits: StoreLimitsBuilder::new().memory_size(max_memory).build(),
                memory_bytes: 0,
                last_growth: 0,
            },
            service,
            effects: Vec::new(),
            call_started: Instant::now(),
            call_budget: Duration::from_secs(1),
            cpu_clock: false,
            cpu_started: None,
        }
    }
}

/// The store's limits ([`StoreLimits`]), which also count the linear
/// memory its instances hold: wasmtime asks the limiter before creating a
/// memory (from 0 bytes) and before each growth, so the sum of what it
/// allowed is the store's linear memory (`wasmhost check` reports it).
pub struct MeteredLimits {
    limits: StoreLimits,
    /// Bytes of linear memory across the store's memories.
    pub memory_bytes: usize,
    /// The growth last allowed, taken back if it then failed.
    last_growth: usize,
}

impl ResourceLimiter for MeteredLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        self.last_growth = 0;
        if allowed && maximum.is_none_or(|max| desired <= max) {
            self.last_growth = desired.saturating_sub(current);
            self.memory_bytes += self.last_growth;
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_bytes -= std::mem::take(&mut self.last_growth);
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl WasiView for StoreData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host::Host for StoreData {
    fn send(&mut self, conn: u64, data: Vec<u8>) {
        // Coalesce consecutive sends to one connection: a service that
        // answers a pipelined batch reply by reply then costs one write.
        if let Some(Effect::Send(last, buf)) = self.effects.last_mut()
            && *last == conn
        {
            buf.extend_from_slice(&data);
            return;
        }
        self.effects.push(Effect::Send(conn, data));
    }

    fn close(&mut self, conn: u64) {
        self.effects.push(Effect::Close(conn));
    }

    fn set_timer(&mut self, token: u64, delay_ms: u64) {
        self.effects
            .push(Effect::SetTimer(token, Duration::from_millis(delay_ms)));
    }

    fn cancel_timer(&mut self, token: u64) {
        self.effects.push(Effect::CancelTimer(token));
    }

    fn log(&mut self, level: LogLevel, message: String) {
        let service = &*self.service;
        match level {
            LogLevel::Trace => tracing::trace!(target: "guest", service, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "guest", service, "{message}"),
            LogLevel::Info => tracing::info!(target: "guest", service, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "guest", service, "{message}"),
            LogLevel::Error => tracing::error!(target: "guest", service, "{message}"),
        }
    }
}

impl crate::bindings::wasmhost::service::types::Host for StoreData {}

/// A guest's stdout or stderr: each line becomes a host log record.
#[derive(Clone)]
struct GuestOutput {
    service: Arc<str>,
    stream: &'static str,
}

impl GuestOutput {
    fn new(service: &Arc<str>, stream: &'static str) -> GuestOutput {
        GuestOutput {
            service: service.clone(),
            stream,
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            out: self.clone(),
            line: Vec::new(),
        })
    }
}

/// Longest line kept before it is logged in pieces.
const MAX_LOG_LINE: usize = 4096;

struct LineLogger {
    out: GuestOutput,
    line: Vec<u8>,
}

impl LineLogger {
    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches(['\r', '\n']);
        tracing::info!(target: "guest", service = &*self.out.service, stream = self.out.stream, "{text}");
        self.line.clear();
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= MAX_LOG_LINE {
                self.emit();
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.line.is_empty() {
            self.emit();
        }
        Poll::Ready(Ok(()))
    }
}
