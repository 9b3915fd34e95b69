//! `server`: serves the explorer in the browser.

use clap::Parser;
use server::model::SpdModel;
use server::web::engine::{EngineGraphs, Prompts};
use server::web::{AppState, GraphBackend, serve};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(about = "Serve the SPD local-attributions explorer")]
struct Args {
    /// Address to listen on [default: LEPTOS_SITE_ADDR, else 127.0.0.1:3000].
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// SPD run to serve (run directory, model_<step>.pth or model.safetensors). Without it the page
    /// shows a placeholder graph.
    #[arg(long, env = "SPD_MODEL")]
    model: Option<PathBuf>,
    /// Database of prompts written by `generate` (or the original tool), opened read-only.
    #[arg(long, env = "SPD_DB", conflicts_with = "prompts")]
    db: Option<PathBuf>,
    /// JSON file of token-id arrays to serve instead of a database [default: prompts.json in the run].
    #[arg(long, env = "SPD_PROMPTS")]
    prompts: Option<PathBuf>,
    /// cpu or cuda:N.
    #[arg(long, env = "SPD_DEVICE", default_value = "cpu")]
    device: String,
}

/// The graph source the flags ask for.
fn backend(args: &Args) -> Result<GraphBackend, String> {
    let Some(model_path) = &args.model else {
        return Ok(GraphBackend::Placeholder);
    };
    let device = server::device::parse_device(&args.device)?;
    let model = SpdModel::load(model_path, &device).map_err(|e| e.to_string())?;
    let run_dir = server::model::checkpoint::locate_run(model_path)
        .map_err(|e| e.to_string())?
        .run_dir;
    let prompts = match (&args.db, &args.prompts) {
        (Some(db), _) => Prompts::Db(std::sync::Mutex::new(
            server::store::schema::open_read_only(db).map_err(|e| e.to_string())?,
        )),
        (None, Some(file)) => Prompts::List(EngineGraphs::read_prompts(file)?),
        (None, None) => Prompts::List(EngineGraphs::read_prompts(&run_dir.join("prompts.json"))?),
    };
    tracing::info!(
        "serving {} with the attribution engine",
        model_path.display()
    );
    Ok(GraphBackend::Engine(Box::new(EngineGraphs::new(
        model, prompts, &run_dir,
    )?)))
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
    let backend = backend(&args).map_err(|e| format!("cannot start: {e}"))?;
    serve(addr, AppState::new(options, backend)).await?;
    Ok(())
}
