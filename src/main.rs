use clap::Parser;
use velero_jupyterhub::cli::{Cli, run};

fn main() {
    let cli = Cli::parse();
    // Sized by --worker-threads, not by the node's cores (tokio's default).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads.into())
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => Err(anyhow::Error::new(e).context("could not start the async runtime")),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("velero-jupyterhub: {e:#}");
            std::process::exit(1);
        }
    }
}
