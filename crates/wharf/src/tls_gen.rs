//! `wharf tls gen`: a self-made CA and the certificates a development broker and its clients
//! need (docs/security.md "TLS"). Production brokers use their organisation's CA.

use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use wharf_server::dev_ca::DevCa;

/// `wharf tls ...`.
#[derive(Debug, clap::Args)]
pub struct TlsArgs {
    #[command(subcommand)]
    action: TlsAction,
}

#[derive(Debug, clap::Subcommand)]
enum TlsAction {
    /// Make a CA (ca.pem, ca.key), a server certificate (server.pem, server.key) and, for
    /// each --client USER, a client certificate whose subject is USER (USER.pem, USER.key).
    Gen {
        /// Directory to write the files in (created; existing files are not overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// Names the server certificate is valid for (DNS names or IP addresses).
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1", "::1"])]
        names: Vec<String>,
        /// Users to make client certificates for (SASL EXTERNAL logs in as them).
        #[arg(long = "client")]
        clients: Vec<String>,
        /// Days the server and client certificates are valid.
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i64).range(1..=3650))]
        days: i64,
    },
}

/// Runs `wharf tls ...`.
pub fn main(args: TlsArgs) -> Result<()> {
    let TlsAction::Gen {
        dir,
        names,
        clients,
        days,
    } = args.action;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files = vec!["ca".to_owned(), "server".to_owned()];
    files.extend(clients.iter().cloned());
    for name in &files {
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            bail!("{name:?} cannot name a file");
        }
        for extension in ["pem", "key"] {
            let path = dir.join(format!("{name}.{extension}"));
            if path.exists() {
                bail!("{} exists already: choose another --dir", path.display());
            }
        }
    }
    let ca = DevCa::new("Wharf development CA")?;
    ca.pem().write(&dir, "ca")?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    ca.server(&names, days)?.write(&dir, "server")?;
    for user in &clients {
        ca.client(user, days)?.write(&dir, user)?;
    }
    println!(
        "wrote {} in {}: serve with --tls-cert {}/server.pem --tls-key {}/server.key, connect with --ca {}/ca.pem",
        files
            .iter()
            .map(|name| format!("{name}.pem/.key"))
            .collect::<Vec<_>>()
            .join(", "),
        dir.display(),
        dir.display(),
        dir.display(),
        dir.display()
    );
    Ok(())
}
