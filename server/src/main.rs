//! `server`: serves the explorer in the browser. With no arguments it serves the built-in demo run,
//! indexing the demo corpus into a database on first start.

use clap::Parser;
use server::web::{AppState, Prompts, Run, Service, serve};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The demo SPD run shipped in the repository (`make demo-model` rebuilds it).
const DEMO_RUN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/demo/run");
/// The demo corpus the demo database is built from.
const DEMO_CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/demo/corpus.txt");
/// Where the demo database is built on first start.
const DEMO_DB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/demo.db");

#[derive(Parser)]
#[command(about = "Serve the SPD local-attributions explorer")]
struct Args {
    /// Address to listen on [default: LEPTOS_SITE_ADDR, else 127.0.0.1:3000].
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// SPD run to serve (run directory, model_<step>.pth or model.safetensors) [default: the
    /// built-in demo].
    #[arg(long, env = "SPD_MODEL")]
    model: Option<PathBuf>,
    /// Database of prompts written by `generate` (or the original tool), opened read-only [default
    /// with the demo: data/demo.db, built on first start].
    #[arg(long, env = "SPD_DB", conflicts_with = "prompts")]
    db: Option<PathBuf>,
    /// JSON file of token-id arrays to serve instead of a database [default: prompts.json in the run].
    #[arg(long, env = "SPD_PROMPTS")]
    prompts: Option<PathBuf>,
    /// cpu or cuda:N.
    #[arg(long, env = "SPD_DEVICE", default_value = "cpu")]
    device: String,
    /// Let cuBLAS use tf32 for float32 matmuls on the CUDA device: faster on recent cards, a little
    /// less exact (needs the `cuda` feature).
    #[arg(long)]
    tf32: bool,
    /// How the fast engine builds a graph: `host` loops over alive rows on the CPU's cores,
    /// `tensor` batches products on the model's device and reads the edges back once; `auto`:
    /// host on a CPU, and for a GPU when this machine has 8 threads or more (measured faster on
    /// an H200 machine's 16 cores), tensor otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    graph_backend: GraphBackend,
    /// Megabytes of computed graphs (compressed) kept in the sidecar `<db>.notes.sqlite`, so a
    /// prompt opened before a restart comes back at once; the least recently used go first. 0
    /// keeps none.
    #[arg(long, env = "SPD_GRAPH_CACHE_MB", default_value_t = 256)]
    graph_cache_mb: u64,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum GraphBackend {
    Auto,
    Host,
    Tensor,
}

/// Indexes the demo corpus, resuming a database left half-written by an interrupted start.
fn build_demo_db(model: &Path, db: &Path, force_new: bool) -> Result<(), String> {
    use server::generate::{self, GenerateConfig, Input, Progress};
    tracing::info!(
        "building the demo database {} from {} (first start only)",
        db.display(),
        DEMO_CORPUS
    );
    if let Some(dir) = db.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let cfg = GenerateConfig {
        model: model.to_owned(),
        output: db.to_owned(),
        input: Input::Corpus {
            path: DEMO_CORPUS.into(),
            column: None,
            tokenizer: None,
            eos_token: None,
            n_ctx: 32,
            seed: 0,
        },
        n_prompts: None,
        batch_size: None,
        // The graph's default threshold, so a component pinned in a graph is found by search.
        thresholds: server::attribution::Thresholds {
            ci: 0.1,
            output_prob: 0.01,
        },
        contexts: Default::default(),
        devices: vec!["cpu".into()],
        workers: None,
        tf32: false,
        unfused: false,
        shard: Default::default(),
        force_new,
        n_blocks: None,
        progress: Progress::Log,
        context_checkpoint: generate::pipeline::DEFAULT_CONTEXT_CHECKPOINT,
        abort_in_batch: None,
    };
    let s = generate::run(&cfg).map_err(|e| format!("building the demo database: {e}"))?;
    tracing::info!(
        "demo database ready: {} prompts in {:.1} s",
        s.prompts_done,
        s.seconds + s.finish_seconds
    );
    Ok(())
}

/// What the demo database holds, against the demo checkpoint with hash `sha256`.
#[derive(Debug, PartialEq)]
enum DemoDb {
    /// A finished index of this checkpoint.
    Ready,
    /// Missing, or a start killed while building it: building resumes.
    Partial,
    /// An index of another checkpoint (the demo was regenerated): built again from scratch.
    Stale,
}

fn demo_db_state(db: &Path, sha256: &str) -> DemoDb {
    let record = server::store::schema::open_read_only(db)
        .ok()
        .and_then(|c| server::store::queries::generation(&c).ok().flatten());
    match record {
        None => DemoDb::Partial,
        Some(g) if g.config["model"]["sha256"].as_str() != Some(sha256) => DemoDb::Stale,
        Some(g) if g.complete => DemoDb::Ready,
        Some(_) => DemoDb::Partial,
    }
}

/// The service the flags ask for.
fn service(args: &Args) -> Result<Service, String> {
    let device = server::device::parse_device(&args.device)?;
    if args.tf32 {
        server::device::enable_tf32_for(std::slice::from_ref(&device))?;
    }
    let demo = args.model.is_none();
    let model_path = args.model.clone().unwrap_or_else(|| DEMO_RUN.into());
    if demo && !model_path.exists() {
        return Err(format!(
            "no --model given and the built-in demo is missing at {DEMO_RUN} (make demo-model \
             rebuilds it)"
        ));
    }
    let backend = match args.graph_backend {
        GraphBackend::Auto => None,
        GraphBackend::Host => Some(server::attribution::Backend::Host),
        GraphBackend::Tensor => Some(server::attribution::Backend::Tensor),
    };
    let run = Run::load_with(&model_path, &device, backend)?;
    let prompts = match (&args.db, &args.prompts) {
        (Some(db), _) => Prompts::open_db(db)?,
        (None, Some(file)) => Prompts::read_list(file)?,
        (None, None) if demo => {
            let db = PathBuf::from(DEMO_DB);
            let sha = server::generate::pipeline::sha256_file(&run.model.checkpoint)
                .map_err(|e| e.to_string())?;
            match demo_db_state(&db, &sha) {
                DemoDb::Ready => {}
                DemoDb::Partial => build_demo_db(&model_path, &db, false)?,
                DemoDb::Stale => {
                    tracing::info!(
                        "{} indexes an older demo model; rebuilding it",
                        db.display()
                    );
                    build_demo_db(&model_path, &db, true)?
                }
            }
            Prompts::open_db(&db)?
        }
        (None, None) => {
            let run_dir = server::model::checkpoint::locate_run(&model_path)
                .map_err(|e| e.to_string())?
                .run_dir;
            let file = run_dir.join("prompts.json");
            if file.is_file() {
                Prompts::read_list(&file)?
            } else {
                tracing::warn!("no --db and no prompts.json in the run: only typed prompts work");
                Prompts::List(vec![])
            }
        }
    };
    tracing::info!("serving {}", model_path.display());
    let service = Service::with_graph_cache(run, prompts, args.graph_cache_mb << 20);
    service.check_database()?;
    Ok(service)
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
    let service = tokio::task::spawn_blocking(move || service(&args))
        .await?
        .map_err(|e| format!("cannot start: {e}"))?;
    serve(addr, AppState::new(options, service)).await?;
    Ok(())
}
