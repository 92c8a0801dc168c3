use clap::Parser;
use tracing_subscriber::EnvFilter;
use vlmserve::cli::{self, Cli};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn,vlmserve=info",
        1 => "debug,ort=info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    cli::run(cli)?;
    Ok(())
}
