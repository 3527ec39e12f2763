use clap::Parser;
use velero_jupyterhub::cli::{Cli, run};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("velero-jupyterhub: {e:#}");
            std::process::exit(1);
        }
    }
}
