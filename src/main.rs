//! The `opamp-operator` command: thin wiring over the library.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use opamp_operator::fleet::{Fleet, FleetConfig};
use opamp_operator::opamp::{OpampServer, ServerConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "opamp-operator", version, about = "Manages fleets of OpAMP agents from Kubernetes")]
struct Cli {
    /// Log format.
    #[arg(long, env = "OPAMP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpAMP endpoint alone, without Kubernetes (every agent in namespace `default`).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address of the OpAMP endpoint (`/v1/opamp`, WebSocket and HTTP).
    #[arg(long, env = "OPAMP_ADDR", default_value = "0.0.0.0:4320")]
    opamp_addr: SocketAddr,
    /// Connected agents beyond this are told to retry later.
    #[arg(long, env = "OPAMP_MAX_AGENTS")]
    max_agents: Option<usize>,
    /// Largest accepted message, in bytes.
    #[arg(long, env = "OPAMP_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    max_message_bytes: usize,
    /// Heartbeat interval agents are expected to keep, in seconds (HTTP agents silent for three
    /// intervals count as disconnected).
    #[arg(long, env = "OPAMP_HEARTBEAT_SECONDS", default_value_t = 30)]
    heartbeat_seconds: u64,
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let heartbeat = Duration::from_secs(args.heartbeat_seconds);
    let fleet = Fleet::new(FleetConfig {
        max_agents: args.max_agents,
        heartbeat_interval: heartbeat,
        ..Default::default()
    });
    let config = ServerConfig {
        max_message_bytes: args.max_message_bytes,
        ws_ping_interval: heartbeat,
        ..Default::default()
    };
    let server = OpampServer::new(fleet, config);
    let listener = tokio::net::TcpListener::bind(args.opamp_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.opamp_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving OpAMP on /v1/opamp");
    let shutdown = server.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    server.serve(listener).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
