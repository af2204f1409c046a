//! `wharf vhost add|delete|list|limits`: the broker's virtual hosts, administered over the
//! protocol (1.3) at `--server`, as a user with the `administrator` tag. There is no offline
//! form: virtual hosts live in the broker's state, not in its users file.

use crate::cli::{Failure, ServerArg, limit_cell, print, print_table, with_client};
use clap::{Args, Subcommand};
use wharf_client::{VhostInfo, VhostLimits};

/// `wharf vhost ...`
#[derive(Debug, Subcommand)]
pub enum Vhost {
    /// Add a virtual host, with limits of its own (none by default). Users need permissions
    /// in it to connect: `wharf permissions set -p NAME USER ...`.
    Add(LimitsArgs),
    /// Delete a virtual host with its queues, exchanges and permissions.
    Delete(NameArgs),
    /// List the virtual hosts: name, max connections, max queues, connections, queues
    /// ("-": no limit).
    List(ServerArg),
    /// Set a virtual host's limits, replacing them: a limit left out is lifted.
    Limits(LimitsArgs),
}

/// A virtual host and its limits.
#[derive(Debug, Args)]
pub struct LimitsArgs {
    /// The virtual host.
    name: String,
    /// Most client connections to it at once [default: no limit].
    #[arg(long, value_name = "N")]
    max_connections: Option<u32>,
    /// Most queues in it [default: no limit].
    #[arg(long, value_name = "N")]
    max_queues: Option<u32>,
    #[command(flatten)]
    server: ServerArg,
}

impl LimitsArgs {
    fn limits(&self) -> VhostLimits {
        VhostLimits {
            max_connections: self.max_connections,
            max_queues: self.max_queues,
        }
    }
}

/// A virtual host.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// The virtual host.
    name: String,
    #[command(flatten)]
    server: ServerArg,
}

/// Runs `wharf vhost ...`.
pub(crate) async fn run(command: Vhost) -> Result<(), Failure> {
    match command {
        Vhost::Add(args) => {
            with_client(&args.server, async |client| {
                client.add_vhost(&args.name, args.limits()).await?;
                print(format_args!("added vhost {}", args.name))
            })
            .await
        }
        Vhost::Delete(args) => {
            with_client(&args.server, async |client| {
                client.delete_vhost(&args.name).await?;
                print(format_args!("deleted vhost {}", args.name))
            })
            .await
        }
        Vhost::List(server) => {
            with_client(&server, async |client| {
                let mut vhosts = client.list_vhosts().await?;
                vhosts.sort_by(|left, right| left.name.cmp(&right.name));
                print_table(
                    &[
                        "name",
                        "max connections",
                        "max queues",
                        "connections",
                        "queues",
                    ],
                    &[false, true, true, true, true],
                    &rows(&vhosts),
                )
            })
            .await
        }
        Vhost::Limits(args) => {
            with_client(&args.server, async |client| {
                client.set_vhost_limits(&args.name, args.limits()).await?;
                print(format_args!("set the limits of vhost {}", args.name))
            })
            .await
        }
    }
}

/// The table's rows: a limit shows as its number, no limit as `-`.
fn rows(vhosts: &[VhostInfo]) -> Vec<Vec<String>> {
    vhosts
        .iter()
        .map(|vhost| {
            vec![
                vhost.name.clone(),
                limit_cell(vhost.limits.max_connections),
                limit_cell(vhost.limits.max_queues),
                vhost.connections.to_string(),
                vhost.queues.to_string(),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_shows_as_a_dash() {
        let vhost = VhostInfo {
            name: "staging".into(),
            limits: VhostLimits {
                max_connections: Some(10),
                max_queues: None,
            },
            connections: 2,
            queues: 0,
        };
        assert_eq!(rows(&[vhost]), vec![vec!["staging", "10", "-", "2", "0"]]);
    }
}
