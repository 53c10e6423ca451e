//! The `wasmhost` binary: parse the command line, set up logging and the
//! runtime, and call the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use wasmhost::cli::{Cli, Command, ServeArgs};
use wasmhost::{ServeOptions, Server, engine, net, service};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let threads = match &cli.command {
        Command::Serve(args) => args
            .threads
            .map_or_else(wasmhost::cli::default_threads, usize::from),
        _ => 1,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .thread_name("wasmhost")
        .build()
        .expect("building the tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Swap(args) => wasmhost::admin::swap(args).await,
            Command::Status(args) => wasmhost::admin::status(args).await,
            Command::Rollback(args) => wasmhost::admin::rollback(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_env("WASMHOST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn serve(args: ServeArgs) -> Result<()> {
    net::raise_fd_limit();
    let opts = serve_options(args)?;
    let mut signals = wasmhost::shutdown::ShutdownSignals::install()?;
    let server = Server::start(opts).await?;
    for (name, addr) in server.addrs() {
        eprintln!("listening on {name} {addr}");
    }
    if let Some(path) = server.control_path() {
        eprintln!("control socket {}", path.display());
    }
    server
        .run(async {
            let sig = signals.received().await;
            tracing::info!("{sig} received");
        })
        .await
}

fn serve_options(args: ServeArgs) -> Result<ServeOptions> {
    let control = match args.no_control {
        true => None,
        false => Some(wasmhost::control::socket_path(args.control, &args.name)?),
    };
    let cache_dir = if args.no_cache {
        None
    } else {
        args.cache_dir.or_else(engine::default_cache_dir)
    };
    Ok(ServeOptions {
        control,
        guest: args.guest,
        name: args.name,
        listen: args.listen,
        config: args.config,
        max_connections: args.max_connections,
        conn_limits: net::ConnLimits {
            read_chunk: args.read_chunk,
            max_output_buffer: args.max_output_buffer,
        },
        instance_limits: service::InstanceLimits {
            event_timeout: Duration::from_millis(args.event_timeout_ms),
            state_timeout: Duration::from_millis(args.state_timeout_ms),
            max_memory: args.max_memory,
        },
        cache_dir,
        shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
    })
}
