//! `server`: serves the explorer in the browser.

use clap::Parser;
use server::web::{AppState, GraphBackend, serve};
use std::net::SocketAddr;

#[derive(Parser)]
#[command(about = "Serve the SPD local-attributions explorer")]
struct Args {
    /// Address to listen on [default: LEPTOS_SITE_ADDR, else 127.0.0.1:3000].
    #[arg(long)]
    addr: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let options = leptos::config::get_configuration(None)?.leptos_options;
    let addr = args.addr.unwrap_or(options.site_addr);
    serve(addr, AppState::new(options, GraphBackend::Placeholder)).await?;
    Ok(())
}
