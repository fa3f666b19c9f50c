//! `operator`: runs ferromq clusters on Kubernetes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The ferromq Kubernetes operator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the BrokerCluster CustomResourceDefinition (YAML).
    Crd,
}

fn main() -> ExitCode {
    broker::logging::init("info");
    match Args::parse().cmd {
        Cmd::Crd => match operator::crd_yaml() {
            Ok(y) => {
                print!("{y}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("operator: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
