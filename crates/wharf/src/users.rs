//! `wharf user add|delete|passwd|tags|list` and `wharf permissions set|clear|list|set-topic|
//! clear-topic|list-topic`: the broker's users and their permissions, edited in its data
//! directory while the broker is stopped (the directory's lock keeps a running broker and
//! this command apart). Online administration over the protocol is not built yet (issue #18).

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use wharf_server::auth::{DEFAULT_VHOST, Permission, Tag, TopicPermission, Users};

/// `wharf user ...`.
#[derive(Debug, clap::Args)]
pub struct UserArgs {
    /// The broker's data directory (the broker must be stopped).
    #[arg(long, global = true, env = "WHARF_DATA_DIR", default_value = wharf_server::config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    #[command(subcommand)]
    action: UserAction,
}

#[derive(Debug, clap::Subcommand)]
enum UserAction {
    /// Add a user.
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
    /// Delete a user.
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
}

/// `wharf permissions ...`.
#[derive(Debug, clap::Args)]
pub struct PermissionArgs {
    /// The broker's data directory (the broker must be stopped).
    #[arg(long, global = true, env = "WHARF_DATA_DIR", default_value = wharf_server::config::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// The virtual host.
    #[arg(short = 'p', long, global = true, default_value = DEFAULT_VHOST)]
    vhost: String,
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

/// Runs `wharf permissions ...`.
pub fn permissions_main(args: PermissionArgs) -> Result<()> {
    let lock = wharf_server::data_dir::lock(&args.data_dir)
        .with_context(|| "the broker must be stopped to change its permissions")?;
    if !lock.dir().join(wharf_server::auth::USERS_FILE).exists() {
        bail!(
            "{} has no users yet: a broker's first start creates the default user",
            lock.dir().display()
        );
    }
    let users = open(&lock, false)?;
    let vhost = args.vhost;
    match args.action {
        PermissionAction::Set {
            user,
            configure,
            write,
            read,
        } => {
            let permission = Permission {
                configure,
                write,
                read,
            };
            users.set_permissions(&user, &vhost, permission)?;
            println!("set the permissions of {user} in vhost {vhost}");
        }
        PermissionAction::Clear { user } => {
            users.clear_permissions(&user, &vhost)?;
            println!("cleared the permissions of {user} in vhost {vhost}");
        }
        PermissionAction::List => {
            println!("user\tconfigure\twrite\tread");
            for (user, _, permission) in users
                .permissions()
                .into_iter()
                .filter(|(_, on, _)| *on == vhost)
            {
                println!(
                    "{user}\t{}\t{}\t{}",
                    permission.configure, permission.write, permission.read
                );
            }
        }
        PermissionAction::SetTopic {
            user,
            exchange,
            write,
            read,
        } => {
            users.set_topic_permissions(
                &user,
                &vhost,
                &exchange,
                TopicPermission { write, read },
            )?;
            println!("set the topic permissions of {user} on {exchange} in vhost {vhost}");
        }
        PermissionAction::ClearTopic { user, exchange } => {
            users.clear_topic_permissions(&user, &vhost, exchange.as_deref())?;
            println!("cleared topic permissions of {user} in vhost {vhost}");
        }
        PermissionAction::ListTopic => {
            println!("user\texchange\twrite\tread");
            for (user, _, exchange, permission) in users
                .topic_permissions()
                .into_iter()
                .filter(|(_, on, _, _)| *on == vhost)
            {
                println!(
                    "{user}\t{exchange}\t{}\t{}",
                    permission.write, permission.read
                );
            }
        }
    }
    Ok(())
}

/// Runs `wharf user ...`.
pub fn main(args: UserArgs) -> Result<()> {
    let lock = wharf_server::data_dir::lock(&args.data_dir)
        .with_context(|| "the broker must be stopped to change its users")?;
    // The default user is created only when a broker starts on a new directory; here an
    // absent file stays absent until a change is made.
    let fresh = !lock.dir().join(wharf_server::auth::USERS_FILE).exists();
    if fresh && !matches!(args.action, UserAction::Add { .. }) {
        bail!(
            "{} has no users yet: a broker's first start creates the default user",
            lock.dir().display()
        );
    }
    let users = open(&lock, fresh)?;
    match args.action {
        UserAction::Add {
            name,
            password,
            tags,
        } => {
            let tags = tags
                .iter()
                .map(|tag| tag.parse::<Tag>())
                .collect::<Result<Vec<_>, _>>()?;
            users.add(&name, &password, &tags)?;
            println!("added user {name}");
        }
        UserAction::Delete { name } => {
            users.delete(&name)?;
            println!("deleted user {name}");
        }
        UserAction::Passwd { name, password } => {
            users.set_password(&name, &password)?;
            println!("changed the password of {name}");
        }
        UserAction::Tags { name, tags } => {
            let tags = tags
                .iter()
                .map(|tag| tag.parse::<Tag>())
                .collect::<Result<Vec<_>, _>>()?;
            users.set_tags(&name, &tags)?;
            println!("set the tags of {name}");
        }
        UserAction::List => {
            for (name, tags) in users.list() {
                let tags: Vec<String> = tags.iter().map(Tag::to_string).collect();
                println!("{name}\t[{}]", tags.join(","));
            }
        }
    }
    Ok(())
}

/// The directory's users; on a directory with none yet, the users file starts empty (no
/// default user: the operator is choosing the users).
fn open(lock: &wharf_server::data_dir::DirLock, fresh: bool) -> Result<Users> {
    if fresh {
        return Ok(Users::open_empty(lock.dir())?);
    }
    Ok(Users::open(lock.dir(), "guest", "guest")?)
}
