//! `wharf user add|delete|passwd|list`: the broker's users, edited in its data directory
//! while the broker is stopped (the directory's lock keeps a running broker and this command
//! apart). Online administration over the protocol comes with permissions (issue #18).

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use wharf_server::auth::{Tag, Users};

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
    /// List the users and their tags.
    List,
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
