//! `wharf user add|delete|passwd|tags|list|set-limits|list-limits` and `wharf permissions
//! set|clear|list|set-topic|clear-topic|list-topic`: the broker's users, their own limits and
//! their permissions.
//!
//! By default they ask a running broker over the protocol (`--server`, as the other client
//! commands), as a user with the `administrator` tag. With `--data-dir` they edit a stopped
//! broker's data directory instead (its lock keeps a running broker and the command apart):
//! the way to set up users before a first start, or to recover a broker whose administrators
//! are lost.

use crate::cli::{ServerArg, connect_as, limit_cell, print_table};
use anyhow::{Context, Result, anyhow, bail};
use std::path::PathBuf;
use wharf_client::{Client, PermissionInfo, TopicPermissionInfo, UserLimits, UserLimitsInfo};
use wharf_server::auth::{DEFAULT_VHOST, Permission, Tag, TopicPermission, Users};

/// `wharf user ...`.
#[derive(Debug, clap::Args)]
pub struct UserArgs {
    /// Edit the users in this data directory of a stopped broker, instead of asking the
    /// running broker at --server.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArg,
    #[command(subcommand)]
    action: UserAction,
}

#[derive(Debug, clap::Subcommand)]
enum UserAction {
    /// Add a user (without permissions: give it some with `wharf permissions set`).
    Add {
        /// User name.
        name: String,
        /// Password (or set WHARF_PASSWORD).
        #[arg(long, env = "WHARF_PASSWORD", hide_env_values = true)]
        password: String,
        /// Tags: administrator, monitoring, management, policymaker (comma-separated).
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
    },
    /// Delete a user and its permissions.
    Delete {
        /// User name.
        name: String,
    },
    /// Set a user's password.
    Passwd {
        /// User name.
        name: String,
        /// New password (or set WHARF_PASSWORD).
        #[arg(long, env = "WHARF_PASSWORD", hide_env_values = true)]
        password: String,
    },
    /// Set a user's tags (replacing them; none: no tags).
    Tags {
        /// User name.
        name: String,
        /// Tags: administrator, monitoring, management, policymaker.
        tags: Vec<String>,
    },
    /// List the users and their tags.
    List,
    /// Set a user's own limits, replacing both: a limit left out is lifted (the broker's
    /// connections_per_user_max still applies), as rabbitmqctl set_user_limits.
    SetLimits {
        /// User name.
        name: String,
        /// Most connections of the user open at once; a login beyond it is refused
        /// [default: no limit].
        #[arg(long, value_name = "N")]
        max_connections: Option<u32>,
        /// Most queues declared by the user that still exist; a declare of a new queue beyond
        /// it is refused [default: no limit].
        #[arg(long, value_name = "N")]
        max_queues: Option<u32>,
    },
    /// List every user's own limits: user, max connections, max queues ("-": no limit).
    ListLimits,
}

/// `wharf permissions ...`.
#[derive(Debug, clap::Args)]
pub struct PermissionArgs {
    /// Edit the permissions in this data directory of a stopped broker, instead of asking the
    /// running broker at --server.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// The virtual host.
    #[arg(short = 'p', long, global = true, default_value = DEFAULT_VHOST)]
    vhost: String,
    #[command(flatten)]
    server: ServerArg,
    #[command(subcommand)]
    action: PermissionAction,
}

#[derive(Debug, clap::Subcommand)]
enum PermissionAction {
    /// Set a user's permissions in the virtual host: three regular expressions over resource
    /// names, as rabbitmqctl set_permissions ('.*' everything, '' nothing, '^app-' a prefix).
    Set {
        /// User name.
        user: String,
        /// Declare and delete queues and exchanges.
        configure: String,
        /// Publish to exchanges; bind into queues and exchanges.
        write: String,
        /// Consume from and purge queues; bind from exchanges.
        read: String,
    },
    /// Remove a user's permissions in the virtual host (it can no longer connect to it).
    Clear {
        /// User name.
        user: String,
    },
    /// List the permissions in the virtual host.
    List,
    /// Set a user's topic permissions on a topic exchange: regular expressions over routing
    /// keys ({username} and {vhost} expand), as rabbitmqctl set_topic_permissions.
    SetTopic {
        /// User name.
        user: String,
        /// The topic exchange.
        exchange: String,
        /// Routing keys the user may publish with.
        write: String,
        /// Binding keys the user may bind with.
        read: String,
    },
    /// Remove a user's topic permissions (on one exchange, or all).
    ClearTopic {
        /// User name.
        user: String,
        /// The exchange (all when left out).
        exchange: Option<String>,
    },
    /// List the topic permissions in the virtual host.
    ListTopic,
}

/// Where the users are changed: a stopped broker's directory, or a running broker.
enum Store {
    /// The users, and the directory's lock, held until the command ends.
    Offline(Users, #[allow(dead_code)] wharf_server::data_dir::DirLock),
    Online(Client, tokio::runtime::Runtime),
}

impl Store {
    /// Online without `data_dir`; offline with it (a directory with no users yet only for
    /// adding users, when `may_create`).
    fn open(data_dir: Option<PathBuf>, server: &ServerArg, may_create: bool) -> Result<Store> {
        let Some(data_dir) = data_dir else {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            let client = runtime
                .block_on(connect_as(
                    server,
                    concat!("wharf-cli/", env!("CARGO_PKG_VERSION")).to_owned(),
                ))
                .map_err(|failure| anyhow!(failure.message))?;
            return Ok(Store::Online(client, runtime));
        };
        let lock = wharf_server::data_dir::lock(&data_dir)
            .with_context(|| "the broker must be stopped to change its users offline")?;
        // The default user is created only when a broker starts on a new directory; here an
        // absent file stays absent until a user is added (then it has exactly those users).
        let fresh = !lock.dir().join(wharf_server::auth::USERS_FILE).exists();
        if fresh && !may_create {
            bail!(
                "{} has no users yet: a broker's first start creates the default user",
                lock.dir().display()
            );
        }
        let users = match fresh {
            true => Users::open_empty(lock.dir())?,
            false => Users::open(lock.dir(), "guest", "guest")?,
        };
        Ok(Store::Offline(users, lock))
    }

    /// Runs `offline` on the directory's users or `online` with the broker.
    fn run<T>(
        &self,
        offline: impl FnOnce(&Users) -> Result<T>,
        online: impl AsyncFnOnce(&Client) -> Result<T, wharf_client::ClientError>,
    ) -> Result<T> {
        match self {
            Store::Offline(users, _) => offline(users),
            Store::Online(client, runtime) => Ok(runtime.block_on(online(client))?),
        }
    }
}

fn parse_tags(tags: &[String]) -> Result<Vec<Tag>> {
    Ok(tags
        .iter()
        .map(|tag| tag.parse::<Tag>())
        .collect::<Result<Vec<_>, _>>()?)
}

/// Runs `wharf user ...`.
pub fn main(args: UserArgs) -> Result<()> {
    let may_create = matches!(args.action, UserAction::Add { .. });
    let store = Store::open(args.data_dir, &args.server, may_create)?;
    match args.action {
        UserAction::Add {
            name,
            password,
            tags,
        } => {
            let parsed = parse_tags(&tags)?;
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            store.run(
                |users| Ok(users.add(&name, &password, &parsed)?),
                async |client| client.add_user(&name, &password, &tags).await,
            )?;
            println!("added user {name}");
        }
        UserAction::Delete { name } => {
            store.run(
                |users| Ok(users.delete(&name)?),
                async |client| client.delete_user(&name).await,
            )?;
            println!("deleted user {name}");
        }
        UserAction::Passwd { name, password } => {
            store.run(
                |users| Ok(users.set_password(&name, &password)?),
                async |client| client.change_password(&name, &password).await,
            )?;
            println!("changed the password of {name}");
        }
        UserAction::Tags { name, tags } => {
            let parsed = parse_tags(&tags)?;
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            store.run(
                |users| Ok(users.set_tags(&name, &parsed)?),
                async |client| client.set_user_tags(&name, &tags).await,
            )?;
            println!("set the tags of {name}");
        }
        UserAction::List => {
            let listed = store.run(
                |users| {
                    Ok(users
                        .list()
                        .into_iter()
                        .map(|(name, tags)| (name, tags.iter().map(Tag::to_string).collect()))
                        .collect::<Vec<(String, Vec<String>)>>())
                },
                async |client| {
                    Ok(client
                        .list_users()
                        .await?
                        .into_iter()
                        .map(|user| (user.name, user.tags))
                        .collect())
                },
            )?;
            for (name, tags) in listed {
                println!("{name}\t[{}]", tags.join(","));
            }
        }
        UserAction::SetLimits {
            name,
            max_connections,
            max_queues,
        } => {
            let limits = UserLimits {
                max_connections,
                max_queues,
            };
            store.run(
                |users| offline_limits::set(users, &name, limits),
                async |client| client.set_user_limits(&name, limits).await,
            )?;
            println!("set the limits of {name}");
        }
        UserAction::ListLimits => {
            let mut listed = store.run(offline_limits::list, async |client| {
                client.list_user_limits().await
            })?;
            listed.sort_by(|left, right| left.user.cmp(&right.user));
            print_table(
                &["user", "max connections", "max queues"],
                &[false, true, true],
                &limit_rows(&listed),
            )
            .map_err(|failure| anyhow!(failure.message))?;
        }
    }
    Ok(())
}

/// The rows of `wharf user list-limits`: a limit shows as its number, no limit as `-`.
fn limit_rows(users: &[UserLimitsInfo]) -> Vec<Vec<String>> {
    users
        .iter()
        .map(|info| {
            vec![
                info.user.clone(),
                limit_cell(info.limits.max_connections),
                limit_cell(info.limits.max_queues),
            ]
        })
        .collect()
}

/// The offline (`--data-dir`) form of `wharf user set-limits|list-limits`, apart from the
/// rest: it needs `Users::set_limits` and `Users::limits` of wharf-server, which the server
/// side of user limits adds. Until then `--data-dir` is refused for these two.
/// User limits in a stopped broker's users file (`--data-dir`).
mod offline_limits {
    use super::*;

    /// Sets `name`'s own limits in a stopped broker's users file.
    pub(super) fn set(users: &Users, name: &str, limits: UserLimits) -> Result<()> {
        Ok(users.set_limits(name, limits.into())?)
    }

    /// Every user's own limits in a stopped broker's users file.
    pub(super) fn list(users: &Users) -> Result<Vec<UserLimitsInfo>> {
        Ok(users.limits_info())
    }
}

/// Runs `wharf permissions ...`.
pub fn permissions_main(args: PermissionArgs) -> Result<()> {
    let store = Store::open(args.data_dir, &args.server, false)?;
    let vhost = args.vhost;
    match args.action {
        PermissionAction::Set {
            user,
            configure,
            write,
            read,
        } => {
            let info = PermissionInfo {
                user: user.clone(),
                vhost: vhost.clone(),
                configure: configure.clone(),
                write: write.clone(),
                read: read.clone(),
            };
            let permission = Permission {
                configure,
                write,
                read,
            };
            store.run(
                |users| Ok(users.set_permissions(&user, &vhost, permission)?),
                async |client| client.set_permissions(info).await,
            )?;
            println!("set the permissions of {user} in vhost {vhost}");
        }
        PermissionAction::Clear { user } => {
            store.run(
                |users| Ok(users.clear_permissions(&user, &vhost)?),
                async |client| client.clear_permissions(&user, &vhost).await,
            )?;
            println!("cleared the permissions of {user} in vhost {vhost}");
        }
        PermissionAction::List => {
            let listed = store.run(
                |users| Ok(users.permissions_in(&vhost)),
                async |client| client.list_permissions(&vhost).await,
            )?;
            println!("user\tconfigure\twrite\tread");
            for info in listed {
                println!(
                    "{}\t{}\t{}\t{}",
                    info.user, info.configure, info.write, info.read
                );
            }
        }
        PermissionAction::SetTopic {
            user,
            exchange,
            write,
            read,
        } => {
            let info = TopicPermissionInfo {
                user: user.clone(),
                vhost: vhost.clone(),
                exchange: exchange.clone(),
                write: write.clone(),
                read: read.clone(),
            };
            store.run(
                |users| {
                    let permission = TopicPermission { write, read };
                    Ok(users.set_topic_permissions(&user, &vhost, &exchange, permission)?)
                },
                async |client| client.set_topic_permissions(info).await,
            )?;
            println!("set the topic permissions of {user} on {exchange} in vhost {vhost}");
        }
        PermissionAction::ClearTopic { user, exchange } => {
            store.run(
                |users| Ok(users.clear_topic_permissions(&user, &vhost, exchange.as_deref())?),
                async |client| {
                    client
                        .clear_topic_permissions(&user, &vhost, exchange.as_deref())
                        .await
                },
            )?;
            println!("cleared topic permissions of {user} in vhost {vhost}");
        }
        PermissionAction::ListTopic => {
            let listed = store.run(
                |users| Ok(users.topic_permissions_in(&vhost)),
                async |client| client.list_topic_permissions(&vhost).await,
            )?;
            println!("user\texchange\twrite\tread");
            for info in listed {
                println!(
                    "{}\t{}\t{}\t{}",
                    info.user, info.exchange, info.write, info.read
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_shows_as_a_dash() {
        let info = UserLimitsInfo {
            user: "alice".into(),
            limits: UserLimits {
                max_connections: None,
                max_queues: Some(10),
            },
        };
        assert_eq!(limit_rows(&[info]), vec![vec!["alice", "-", "10"]]);
    }
}
