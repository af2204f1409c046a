//! Users and authentication (issue #18): the users of a broker, their passwords hashed with
//! argon2id, stored durably in `DATA_DIR/users.json`, and the check of a client's `Hello`
//! credentials (SASL `PLAIN`; `ANONYMOUS` only when enabled).
//!
//! The file is replaced atomically (written to a temporary file, fsynced, renamed over the
//! old one, and the directory fsynced) before a change is reported done, so a user added is
//! there after a crash, and a torn write never leaves a broker without users. A first start
//! (no file) creates the default user (`guest`/`guest` unless `--default-user` /
//! `--default-pass` say otherwise) with the `administrator` tag, as RabbitMQ does; `guest`
//! may only connect from a loopback address (`loopback_users`).
//!
//! Permissions (what a user may do in a virtual host) are kept with the users, in the same
//! file and under the same lock, with RabbitMQ's model: three regular expressions over
//! resource names (configure, write, read) per user per virtual host, and topic permissions
//! (write, read) over routing keys per topic exchange. `access.rs` checks them. Every change
//! bumps a generation number, by which connections know to forget what they checked.
//!
//! Verifying an argon2id hash takes tens of milliseconds of CPU on purpose. A successful
//! verification is remembered as a keyed 128-bit digest of the password (keys drawn at
//! random per process), so a client reconnecting with the same password is not charged the
//! KDF again; a changed password or user drops the entry.

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The file holding the users, in the data directory.
pub const USERS_FILE: &str = "users.json";
use crate::limits::{
    PASSWORD_BYTES_MAX, PERMISSION_PATTERN_BYTES_MAX, PERMISSION_REGEX_BYTES_MAX,
    TOPIC_PERMISSIONS_MAX, USER_NAME_BYTES_MAX, USERS_MAX,
};

/// The virtual host every broker has (and, until more can be made, the only one).
pub const DEFAULT_VHOST: &str = "/";

/// The version of the users file this build writes. Version 1 (no permissions) is read and
/// upgraded: its users had every right, so each is given full permissions on `/`.
const USERS_FILE_VERSION: u32 = 2;

/// A user's permissions in one virtual host, as RabbitMQ's: regular expressions over the
/// names of exchanges and queues, matched unanchored (write `^...$` to anchor). The empty
/// pattern matches nothing, as RabbitMQ's. The default exchange is named `amq.default` here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    /// Declare and delete resources (and declare a queue with a dead-letter exchange).
    pub configure: String,
    /// Publish to an exchange; bind a queue or exchange as a binding's destination.
    pub write: String,
    /// Consume from, purge or redrive a queue; bind from an exchange as a binding's source.
    pub read: String,
}

impl Permission {
    /// Every right on every resource (`.*` three times): the default user's on `/`.
    pub fn full() -> Permission {
        Permission {
            configure: ".*".to_owned(),
            write: ".*".to_owned(),
            read: ".*".to_owned(),
        }
    }

    fn check(&self) -> Result<(), AuthError> {
        for pattern in [&self.configure, &self.write, &self.read] {
            compile_pattern(pattern)?;
        }
        Ok(())
    }
}

/// A user's topic permissions on one topic exchange of a virtual host, as RabbitMQ's: regular
/// expressions over routing keys. `write` is checked on every publish to the exchange,
/// `read` on every binding from it. `{username}` and `{vhost}` in a pattern stand for the
/// user's name and the virtual host (regex-escaped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPermission {
    /// Routing keys the user may publish with.
    pub write: String,
    /// Binding keys the user may bind queues with.
    pub read: String,
}

/// Compiles a permission pattern: bounded in length and in compiled size; the empty pattern
/// matches nothing.
pub fn compile_pattern(pattern: &str) -> Result<regex::Regex, AuthError> {
    if pattern.len() > PERMISSION_PATTERN_BYTES_MAX {
        return Err(AuthError::Invalid(format!(
            "a permission pattern is at most {PERMISSION_PATTERN_BYTES_MAX} bytes"
        )));
    }
    let pattern = if pattern.is_empty() { "^$" } else { pattern };
    regex::RegexBuilder::new(pattern)
        .size_limit(PERMISSION_REGEX_BYTES_MAX)
        .build()
        .map_err(|err| AuthError::Invalid(format!("bad permission pattern {pattern:?}: {err}")))
}

/// A topic permission pattern with `{username}` and `{vhost}` replaced, compiled.
pub fn compile_topic_pattern(
    pattern: &str,
    user: &str,
    vhost: &str,
) -> Result<regex::Regex, AuthError> {
    compile_pattern(
        &pattern
            .replace("{username}", &regex::escape(user))
            .replace("{vhost}", &regex::escape(vhost)),
    )
}

/// A user's tags, as RabbitMQ's (they grant access to the coming HTTP API and administration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tag {
    /// Everything, users and permissions included.
    Administrator,
    /// Read-only access to every object and statistic.
    Monitoring,
    /// Access to the management interface for the user's own objects.
    Management,
    /// Policies and parameters of the user's virtual hosts.
    Policymaker,
}

impl std::str::FromStr for Tag {
    type Err = AuthError;

    fn from_str(text: &str) -> Result<Tag, AuthError> {
        match text {
            "administrator" => Ok(Tag::Administrator),
            "monitoring" => Ok(Tag::Monitoring),
            "management" => Ok(Tag::Management),
            "policymaker" => Ok(Tag::Policymaker),
            other => Err(AuthError::Invalid(format!(
                "unknown tag {other:?} (administrator, monitoring, management, policymaker)"
            ))),
        }
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tag::Administrator => "administrator",
            Tag::Monitoring => "monitoring",
            Tag::Management => "management",
            Tag::Policymaker => "policymaker",
        })
    }
}

/// One user as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Its argon2id hash in PHC string form (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
    pub password_hash: String,
    /// Its tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
    /// Its permissions, by virtual host (none: it may not connect to that virtual host).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub permissions: BTreeMap<String, Permission>,
    /// Its topic permissions, by virtual host and exchange.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub topic_permissions: BTreeMap<String, BTreeMap<String, TopicPermission>>,
    /// Its own limits (RabbitMQ's user limits), beyond the broker's.
    #[serde(default, skip_serializing_if = "UserLimits::is_unlimited")]
    pub limits: UserLimits,
}

/// A user's own limits; `None`: none beyond the broker's (`connections_per_user_max`,
/// `queues_max`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLimits {
    /// Most connections it may have open at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Most queues it may have declared that still exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queues: Option<u32>,
}

impl UserLimits {
    /// Whether neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        *self == UserLimits::default()
    }
}

impl From<wharf_protocol::UserLimits> for UserLimits {
    fn from(limits: wharf_protocol::UserLimits) -> UserLimits {
        UserLimits {
            max_connections: limits.max_connections,
            max_queues: limits.max_queues,
        }
    }
}

impl From<UserLimits> for wharf_protocol::UserLimits {
    fn from(limits: UserLimits) -> wharf_protocol::UserLimits {
        wharf_protocol::UserLimits {
            max_connections: limits.max_connections,
            max_queues: limits.max_queues,
        }
    }
}

/// A user's grants in a virtual host, compiled: shared by every connection of the user (a
/// compiled pattern holds kilobytes; 10,000 connections of one user hold one copy).
#[derive(Debug)]
pub struct CompiledGrants {
    /// Configure, over resource names.
    pub configure: regex::Regex,
    /// Write, over resource names.
    pub write: regex::Regex,
    /// Read, over resource names.
    pub read: regex::Regex,
    /// Topic exchange → (write, read) over routing keys.
    pub topics: HashMap<String, (regex::Regex, regex::Regex)>,
}

impl CompiledGrants {
    fn new(grants: &Grants, user: &str, vhost: &str) -> Option<CompiledGrants> {
        // The patterns were compiled when they were set; one that no longer compiles (a file
        // edited by hand) grants nothing rather than everything.
        Some(CompiledGrants {
            configure: compile_pattern(&grants.permission.configure).ok()?,
            write: compile_pattern(&grants.permission.write).ok()?,
            read: compile_pattern(&grants.permission.read).ok()?,
            topics: grants
                .topics
                .iter()
                .map(|(exchange, topic)| {
                    Some((
                        exchange.clone(),
                        (
                            compile_topic_pattern(&topic.write, user, vhost).ok()?,
                            compile_topic_pattern(&topic.read, user, vhost).ok()?,
                        ),
                    ))
                })
                .collect::<Option<_>>()?,
        })
    }
}

/// Compiled grants by (user, virtual host), all of one generation (a change empties it).
type CompiledCache = (u64, HashMap<(String, String), Option<Arc<CompiledGrants>>>);

/// What a user may do in one virtual host, as of one generation of the users file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// The user's permissions there.
    pub permission: Permission,
    /// Its topic permissions there, by exchange.
    pub topics: BTreeMap<String, TopicPermission>,
}

/// The file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    /// Format version (1).
    version: u32,
    users: BTreeMap<String, User>,
}

/// What can go wrong with users.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The users file cannot be read, parsed or written.
    #[error("users file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A name, password or tag is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The user does not exist.
    #[error("no user {0:?}")]
    NoSuchUser(String),
    /// The user exists already.
    #[error("user {0:?} exists already")]
    UserExists(String),
    /// Too many users.
    #[error("the broker has its maximum of {USERS_MAX} users")]
    TooMany,
    /// The virtual host name is not a valid name (whether it exists is the broker's to say:
    /// virtual hosts live in its log, not in this file).
    #[error("invalid virtual host name {0:?}")]
    NoSuchVhost(String),
}

/// Why a login was refused (logged for the operator; the client is told only that it was).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// A mechanism the server does not offer.
    #[error("mechanism {0:?} is not supported (PLAIN; EXTERNAL over TLS; ANONYMOUS when enabled)")]
    Mechanism(String),
    /// `ANONYMOUS` while `allow_anonymous` is off.
    #[error("anonymous logins are not enabled")]
    AnonymousDisabled,
    /// `PLAIN` data that is not `[authzid] NUL user NUL password`.
    #[error("malformed PLAIN credentials")]
    Malformed,
    /// No such user.
    #[error("unknown user")]
    UnknownUser,
    /// The password does not match.
    #[error("wrong password")]
    WrongPassword,
    /// A loopback-only user from another address.
    #[error("user may only connect from a loopback address")]
    NotLoopback,
    /// `EXTERNAL` without a verified client certificate.
    #[error("EXTERNAL needs a client certificate verified by the TLS listener")]
    NoCertificate,
}

impl Refusal {
    /// What the client is told: nothing that says whether the user exists.
    pub fn client_reason(&self) -> String {
        match self {
            Refusal::Mechanism(_)
            | Refusal::AnonymousDisabled
            | Refusal::Malformed
            | Refusal::NoCertificate => self.to_string(),
            Refusal::UnknownUser | Refusal::WrongPassword | Refusal::NotLoopback => {
                "login refused: check the user name and password".to_owned()
            }
        }
    }
}

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user that logged in.
    User(String),
    /// `ANONYMOUS`, when enabled.
    Anonymous,
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::User(name) => f.write_str(name),
            Principal::Anonymous => f.write_str("(anonymous)"),
        }
    }
}

/// The broker's users: the file, its contents, and the cache of verified passwords.
pub struct Users {
    path: PathBuf,
    users: Mutex<BTreeMap<String, User>>,
    /// Held by a change from its copy of the users to its swap: changes go one at a time,
    /// while readers (logins, permission refreshes) wait only for the swap, never for the
    /// file's fsyncs.
    writer: Mutex<()>,
    /// User → (its hash when verified, keyed digest of the password that matched it).
    verified: Mutex<HashMap<String, (String, u128)>>,
    keys: (RandomState, RandomState),
    /// Bumped (with the lock held) by every change: connections compare it with the one their
    /// cached permission answers came from.
    generation: AtomicU64,
    /// Grants compiled for the current generation, shared by connections.
    compiled: Mutex<CompiledCache>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn check_name(name: &str) -> Result<(), AuthError> {
    if name.is_empty() || name.len() > USER_NAME_BYTES_MAX || name.chars().any(char::is_control) {
        return Err(AuthError::Invalid(format!(
            "a user name is 1 to {USER_NAME_BYTES_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

/// Hashes a password with argon2id and a fresh random salt (blocking: tens of ms).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    if password.is_empty() || password.len() > PASSWORD_BYTES_MAX {
        return Err(AuthError::Invalid(format!(
            "a password is 1 to {PASSWORD_BYTES_MAX} bytes"
        )));
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| AuthError::Invalid(format!("cannot hash the password: {err}")))
}

impl Users {
    /// Opens the users of the data directory `dir`; if it has none yet (a first start),
    /// creates `default_user` with `default_pass` and the administrator tag.
    pub fn open(dir: &Path, default_user: &str, default_pass: &str) -> Result<Users, AuthError> {
        let created = !dir.join(USERS_FILE).exists();
        let users = Users::open_file(dir)?;
        if created {
            check_name(default_user)?;
            let password_hash = hash_password(default_pass)?;
            users.update(|all| {
                all.insert(
                    default_user.to_owned(),
                    User {
                        password_hash,
                        tags: vec![Tag::Administrator],
                        permissions: BTreeMap::from([(
                            DEFAULT_VHOST.to_owned(),
                            Permission::full(),
                        )]),
                        topic_permissions: BTreeMap::new(),
                        limits: UserLimits::default(),
                    },
                );
                Ok(())
            })?;
            tracing::info!(user = default_user, "created the default user");
        }
        Ok(users)
    }

    fn open_file(dir: &Path) -> Result<Users, AuthError> {
        let path = dir.join(USERS_FILE);
        let file_error = |reason: String| AuthError::File {
            path: path.clone(),
            reason,
        };
        let (users, upgrade) = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: UsersFile = serde_json::from_slice(&bytes)
                    .map_err(|err| file_error(format!("not a users file: {err}")))?;
                match file.version {
                    1 => {
                        // Before permissions, every user could do everything on `/`.
                        let mut users = file.users;
                        for user in users.values_mut() {
                            user.permissions
                                .insert(DEFAULT_VHOST.to_owned(), Permission::full());
                        }
                        (users, true)
                    }
                    USERS_FILE_VERSION => (file.users, false),
                    other => return Err(file_error(format!("unknown version {other}"))),
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => (BTreeMap::new(), false),
            Err(err) => return Err(file_error(err.to_string())),
        };
        let users = Users {
            path,
            users: Mutex::new(users),
            writer: Mutex::new(()),
            verified: Mutex::default(),
            keys: (RandomState::new(), RandomState::new()),
            generation: AtomicU64::new(0),
            compiled: Mutex::default(),
        };
        if upgrade {
            users.update(|_| Ok(()))?;
            tracing::info!(
                "upgraded the users file to version {USERS_FILE_VERSION}: existing users keep full permissions on /"
            );
        }
        Ok(users)
    }

    /// Opens the users of `dir` without creating a default user when it has none (the
    /// `wharf user` command, where the operator chooses the users).
    pub fn open_empty(dir: &Path) -> Result<Users, AuthError> {
        let users = Users::open_file(dir)?;
        Ok(users)
    }

    fn digest(&self, password: &str) -> u128 {
        let half = |state: &RandomState| {
            let mut hasher = state.build_hasher();
            hasher.write(password.as_bytes());
            hasher.finish()
        };
        (u128::from(half(&self.keys.0)) << 64) | u128::from(half(&self.keys.1))
    }

    /// Checks a user's password (blocking: runs the KDF unless this password was verified
    /// for this user before).
    pub fn verify(&self, name: &str, password: &str) -> Result<(), Refusal> {
        let hash = {
            let users = self.users.lock().expect("users lock");
            match users.get(name) {
                Some(user) => user.password_hash.clone(),
                None => {
                    drop(users);
                    // As long as a wrong password takes: the timing says nothing either.
                    let _ = Argon2::default().verify_password(
                        password.as_bytes(),
                        &PasswordHash::new(DUMMY_HASH).expect("a valid PHC string"),
                    );
                    return Err(Refusal::UnknownUser);
                }
            }
        };
        let digest = self.digest(password);
        if self
            .verified
            .lock()
            .expect("verified lock")
            .get(name)
            .is_some_and(|(verified_hash, verified)| *verified_hash == hash && *verified == digest)
        {
            return Ok(());
        }
        let parsed = PasswordHash::new(&hash).map_err(|_| Refusal::WrongPassword)?;
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .map_err(|_| Refusal::WrongPassword)?;
        self.verified
            .lock()
            .expect("verified lock")
            .insert(name.to_owned(), (hash, digest));
        Ok(())
    }

    /// Applies `change` to a copy of the users, stores the copy, and only then makes it the
    /// users (a failed store changes nothing); bumps the generation.
    fn update(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, User>) -> Result<(), AuthError>,
    ) -> Result<(), AuthError> {
        let _writer = self.writer.lock().expect("users writer lock");
        let mut next = self.users.lock().expect("users lock").clone();
        change(&mut next)?;
        self.store(&next)?;
        *self.users.lock().expect("users lock") = next;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Adds a user, without permissions (blocking: hashes the password, rewrites the file).
    pub fn add(&self, name: &str, password: &str, tags: &[Tag]) -> Result<(), AuthError> {
        check_name(name)?;
        let password_hash = hash_password(password)?;
        let mut tags = tags.to_vec();
        tags.sort();
        tags.dedup();
        self.update(|users| {
            if users.contains_key(name) {
                return Err(AuthError::UserExists(name.to_owned()));
            }
            if users.len() >= USERS_MAX {
                return Err(AuthError::TooMany);
            }
            users.insert(
                name.to_owned(),
                User {
                    password_hash,
                    tags,
                    permissions: BTreeMap::new(),
                    topic_permissions: BTreeMap::new(),
                    limits: UserLimits::default(),
                },
            );
            Ok(())
        })
    }

    /// Deletes a user and its permissions (its connections stay open until they close, with
    /// no permission left: what they ask next is refused).
    pub fn delete(&self, name: &str) -> Result<(), AuthError> {
        self.update(|users| {
            users
                .remove(name)
                .map(drop)
                .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))
        })?;
        self.verified.lock().expect("verified lock").remove(name);
        Ok(())
    }

    /// Sets a user's password.
    pub fn set_password(&self, name: &str, password: &str) -> Result<(), AuthError> {
        let password_hash = hash_password(password)?;
        self.update(|users| {
            users
                .get_mut(name)
                .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))?
                .password_hash = password_hash;
            Ok(())
        })?;
        self.verified.lock().expect("verified lock").remove(name);
        Ok(())
    }

    /// Sets a user's tags.
    pub fn set_tags(&self, name: &str, tags: &[Tag]) -> Result<(), AuthError> {
        let mut tags = tags.to_vec();
        tags.sort();
        tags.dedup();
        self.update(|users| {
            users
                .get_mut(name)
                .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))?
                .tags = tags;
            Ok(())
        })
    }

    /// A user's tags (`None`: no such user).
    pub fn tags(&self, name: &str) -> Option<Vec<Tag>> {
        let users = self.users.lock().expect("users lock");
        users.get(name).map(|user| user.tags.clone())
    }

    /// Sets a user's own limits (replacing both).
    pub fn set_limits(&self, name: &str, limits: UserLimits) -> Result<(), AuthError> {
        self.update(|users| {
            users
                .get_mut(name)
                .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))?
                .limits = limits;
            Ok(())
        })
    }

    /// A user's own limits (`None`: no such user).
    pub fn limits_of(&self, name: &str) -> Option<UserLimits> {
        let users = self.users.lock().expect("users lock");
        users.get(name).map(|user| user.limits)
    }

    /// Every user's own limits, by name.
    pub fn limits(&self) -> Vec<(String, UserLimits)> {
        let users = self.users.lock().expect("users lock");
        users
            .iter()
            .map(|(name, user)| (name.clone(), user.limits))
            .collect()
    }

    /// Every user's own limits, by name, as the protocol lists them.
    pub fn limits_info(&self) -> Vec<wharf_protocol::UserLimitsInfo> {
        self.limits()
            .into_iter()
            .map(|(user, limits)| wharf_protocol::UserLimitsInfo {
                user,
                limits: limits.into(),
            })
            .collect()
    }

    /// Sets a user's permissions in a virtual host (replacing any).
    pub fn set_permissions(
        &self,
        name: &str,
        vhost: &str,
        permission: Permission,
    ) -> Result<(), AuthError> {
        check_vhost(vhost)?;
        permission.check()?;
        self.update(|users| {
            users
                .get_mut(name)
                .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))?
                .permissions
                .insert(vhost.to_owned(), permission);
            Ok(())
        })
    }

    /// Removes a user's permissions in a virtual host (and its topic permissions there): it
    /// may no longer connect to it. Clearing what is not set is no error.
    pub fn clear_permissions(&self, name: &str, vhost: &str) -> Result<(), AuthError> {
        check_vhost(vhost)?;
        self.update(|users| {
            let user = users
                .get_mut(name)
                .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))?;
            user.permissions.remove(vhost);
            user.topic_permissions.remove(vhost);
            Ok(())
        })
    }

    /// Removes every user's permissions and topic permissions in `vhost` (it is being
    /// deleted). Bumps the generation even when nobody had any, which is harmless.
    pub fn clear_vhost(&self, vhost: &str) -> Result<(), AuthError> {
        check_vhost(vhost)?;
        self.update(|users| {
            for user in users.values_mut() {
                user.permissions.remove(vhost);
                user.topic_permissions.remove(vhost);
            }
            Ok(())
        })
    }

    /// Sets a user's topic permissions on an exchange of a virtual host (replacing any).
    pub fn set_topic_permissions(
        &self,
        name: &str,
        vhost: &str,
        exchange: &str,
        permission: TopicPermission,
    ) -> Result<(), AuthError> {
        check_vhost(vhost)?;
        compile_topic_pattern(&permission.write, name, vhost)?;
        compile_topic_pattern(&permission.read, name, vhost)?;
        self.update(|users| {
            let topics = users
                .get_mut(name)
                .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))?
                .topic_permissions
                .entry(vhost.to_owned())
                .or_default();
            if !topics.contains_key(exchange) && topics.len() >= TOPIC_PERMISSIONS_MAX {
                return Err(AuthError::Invalid(format!(
                    "a user has topic permissions on at most {TOPIC_PERMISSIONS_MAX} exchanges per virtual host"
                )));
            }
            topics.insert(exchange.to_owned(), permission);
            Ok(())
        })
    }

    /// Removes a user's topic permissions on one exchange (`Some`) or all (`None`) of a
    /// virtual host.
    pub fn clear_topic_permissions(
        &self,
        name: &str,
        vhost: &str,
        exchange: Option<&str>,
    ) -> Result<(), AuthError> {
        check_vhost(vhost)?;
        self.update(|users| {
            let user = users
                .get_mut(name)
                .ok_or_else(|| AuthError::NoSuchUser(name.to_owned()))?;
            match exchange {
                Some(exchange) => {
                    if let Some(topics) = user.topic_permissions.get_mut(vhost) {
                        topics.remove(exchange);
                        if topics.is_empty() {
                            user.topic_permissions.remove(vhost);
                        }
                    }
                }
                None => {
                    user.topic_permissions.remove(vhost);
                }
            }
            Ok(())
        })
    }

    /// Every user's permissions: (user, virtual host, permission), by user.
    pub fn permissions(&self) -> Vec<(String, String, Permission)> {
        let users = self.users.lock().expect("users lock");
        users
            .iter()
            .flat_map(|(name, user)| {
                user.permissions
                    .iter()
                    .map(|(vhost, permission)| (name.clone(), vhost.clone(), permission.clone()))
            })
            .collect()
    }

    /// Every user's topic permissions: (user, virtual host, exchange, permission).
    pub fn topic_permissions(&self) -> Vec<(String, String, String, TopicPermission)> {
        let users = self.users.lock().expect("users lock");
        users
            .iter()
            .flat_map(|(name, user)| {
                user.topic_permissions
                    .iter()
                    .flat_map(move |(vhost, topics)| {
                        topics.iter().map(move |(exchange, permission)| {
                            (
                                name.clone(),
                                vhost.clone(),
                                exchange.clone(),
                                permission.clone(),
                            )
                        })
                    })
            })
            .collect()
    }

    /// The permissions in `vhost`, by user, as the protocol lists them.
    pub fn permissions_in(&self, vhost: &str) -> Vec<wharf_protocol::PermissionInfo> {
        self.permissions()
            .into_iter()
            .filter(|(_, on, _)| on == vhost)
            .map(|(user, vhost, permission)| wharf_protocol::PermissionInfo {
                user,
                vhost,
                configure: permission.configure,
                write: permission.write,
                read: permission.read,
            })
            .collect()
    }

    /// The topic permissions in `vhost`, by user and exchange, as the protocol lists them.
    pub fn topic_permissions_in(&self, vhost: &str) -> Vec<wharf_protocol::TopicPermissionInfo> {
        self.topic_permissions()
            .into_iter()
            .filter(|(_, on, _, _)| on == vhost)
            .map(
                |(user, vhost, exchange, permission)| wharf_protocol::TopicPermissionInfo {
                    user,
                    vhost,
                    exchange,
                    write: permission.write,
                    read: permission.read,
                },
            )
            .collect()
    }

    /// What `name` may do in `vhost`, compiled, and the generation it belongs to: compiled once
    /// per generation and shared (`None`: nothing, it may not even connect).
    pub fn compiled_grants(&self, name: &str, vhost: &str) -> (u64, Option<Arc<CompiledGrants>>) {
        let (generation, grants) = self.grants(name, vhost);
        let mut cache = self.compiled.lock().expect("compiled grants lock");
        if generation > cache.0 {
            cache.0 = generation;
            cache.1.clear();
        }
        let key = (name.to_owned(), vhost.to_owned());
        if generation == cache.0
            && let Some(compiled) = cache.1.get(&key)
        {
            return (generation, compiled.clone());
        }
        let compiled = grants
            .and_then(|grants| CompiledGrants::new(&grants, name, vhost))
            .map(Arc::new);
        // An answer of an older generation (another thread moved on meanwhile) is not kept.
        if generation == cache.0 {
            cache.1.insert(key, compiled.clone());
        }
        (generation, compiled)
    }

    /// The generation of the users and their permissions (changes with every change).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// What `name` may do in `vhost` (`None`: nothing, it may not even connect), and the
    /// generation this answer belongs to.
    pub fn grants(&self, name: &str, vhost: &str) -> (u64, Option<Grants>) {
        let users = self.users.lock().expect("users lock");
        let generation = self.generation.load(Ordering::Acquire);
        let grants = users.get(name).and_then(|user| {
            let permission = user.permissions.get(vhost)?.clone();
            Some(Grants {
                permission,
                topics: user
                    .topic_permissions
                    .get(vhost)
                    .cloned()
                    .unwrap_or_default(),
            })
        });
        (generation, grants)
    }

    /// Whether a user exists.
    pub fn exists(&self, name: &str) -> bool {
        self.users.lock().expect("users lock").contains_key(name)
    }

    /// Every user and its tags, by name.
    pub fn list(&self) -> Vec<(String, Vec<Tag>)> {
        self.users
            .lock()
            .expect("users lock")
            .iter()
            .map(|(name, user)| (name.clone(), user.tags.clone()))
            .collect()
    }

    /// Replaces the file with `users`: a temporary file written and fsynced, renamed over
    /// the old one, the directory fsynced. A failure leaves the old file whole.
    fn store(&self, users: &BTreeMap<String, User>) -> Result<(), AuthError> {
        let file_error = |reason: String| AuthError::File {
            path: self.path.clone(),
            reason,
        };
        let file = UsersFile {
            version: USERS_FILE_VERSION,
            users: users.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("users serialize");
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut out = std::fs::File::create(&tmp)?;
            out.write_all(&bytes)?;
            out.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|err| file_error(err.to_string()))
    }
}

/// Refuses a virtual host that does not exist (only `/`, until they can be made).
fn check_vhost(vhost: &str) -> Result<(), AuthError> {
    match wharf_core::validate_name(vhost) {
        Ok(()) => Ok(()),
        Err(_) => Err(AuthError::NoSuchVhost(vhost.to_owned())),
    }
}

/// A valid argon2id hash of a password nobody has, verified against for unknown users.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0zZ8GmZ8x6d7aK8ZfGkS2l2gC6i0v6z6lQy3Lw5Zt1M";

/// The user name of `PLAIN` credentials, for logs (never the password).
pub fn plain_user(data: &[u8]) -> Option<&str> {
    // Only well-formed data (three fields): in malformed data the second field may well be
    // the password.
    let fields: Vec<&[u8]> = data.split(|byte| *byte == 0).collect();
    match fields[..] {
        [_, user, _] => std::str::from_utf8(user).ok(),
        _ => None,
    }
}

/// The broker's rules for logins (from its configuration).
#[derive(Debug, Clone, Copy)]
pub struct LoginRules<'a> {
    /// Whether `ANONYMOUS` is accepted.
    pub allow_anonymous: bool,
    /// The user an `ANONYMOUS` login acts as.
    pub anonymous_user: &'a str,
    /// Users that may only log in from a loopback address.
    pub loopback_users: &'a [String],
}

/// The client's credentials, as the `Hello` carries them, checked (blocking: may run the
/// KDF). `loopback_users` may only log in from a loopback address; an `ANONYMOUS` login,
/// which acts as `anonymous_user`, too if that user is one of them. `certificate_user` is the
/// common name of the client certificate TLS verified, the user of `EXTERNAL`.
pub fn authenticate(
    users: &Users,
    rules: LoginRules<'_>,
    mechanism: &str,
    data: &[u8],
    peer: IpAddr,
    certificate_user: Option<&str>,
) -> Result<Principal, Refusal> {
    let LoginRules {
        allow_anonymous,
        anonymous_user,
        loopback_users,
    } = rules;
    let loopback_only = |user: &str| {
        // An IPv4 peer of a dual-stack listener shows as ::ffff:a.b.c.d.
        loopback_users.iter().any(|name| name == user) && !peer.to_canonical().is_loopback()
    };
    match mechanism {
        "ANONYMOUS" if allow_anonymous && loopback_only(anonymous_user) => {
            Err(Refusal::NotLoopback)
        }
        "ANONYMOUS" if allow_anonymous => Ok(Principal::Anonymous),
        "ANONYMOUS" => Err(Refusal::AnonymousDisabled),
        // RFC 4422 EXTERNAL: the user is the one the TLS layer verified (its certificate's
        // common name); the optional authorization identity, if given, must be that user.
        "EXTERNAL" => {
            let Some(user) = certificate_user else {
                return Err(Refusal::NoCertificate);
            };
            if !data.is_empty() && data != user.as_bytes() {
                return Err(Refusal::Malformed);
            }
            if !users.exists(user) {
                return Err(Refusal::UnknownUser);
            }
            if loopback_only(user) {
                return Err(Refusal::NotLoopback);
            }
            Ok(Principal::User(user.to_owned()))
        }
        "PLAIN" => {
            // RFC 4616: [authzid] NUL authcid NUL passwd.
            let mut parts = data.split(|byte| *byte == 0);
            let (Some(_authzid), Some(user), Some(password), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(Refusal::Malformed);
            };
            let (Ok(user), Ok(password)) =
                (std::str::from_utf8(user), std::str::from_utf8(password))
            else {
                return Err(Refusal::Malformed);
            };
            if password.len() > PASSWORD_BYTES_MAX {
                return Err(Refusal::WrongPassword);
            }
            users.verify(user, password)?;
            if loopback_only(user) {
                return Err(Refusal::NotLoopback);
            }
            Ok(Principal::User(user.to_owned()))
        }
        other => Err(Refusal::Mechanism(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(user: &str, password: &str) -> Vec<u8> {
        format!("\0{user}\0{password}").into_bytes()
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const REMOTE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3));

    #[test]
    fn the_dummy_hash_is_a_valid_argon2id_hash() {
        let hash = PasswordHash::new(DUMMY_HASH).expect("parses");
        assert_eq!(hash.algorithm.as_str(), "argon2id");
    }

    #[test]
    fn a_first_start_creates_the_default_user_and_users_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let users = Users::open(dir.path(), "guest", "guest").unwrap();
        assert_eq!(
            users.list(),
            vec![("guest".to_owned(), vec![Tag::Administrator])]
        );
        users.add("alice", "s3cret", &[Tag::Monitoring]).unwrap();
        let text = std::fs::read_to_string(dir.path().join(USERS_FILE)).unwrap();
        assert!(!text.contains("s3cret"), "the password is never stored");
        assert!(text.contains("$argon2id$"), "{text}");
        drop(users);
        // Reopened: no default user is added again (even with other defaults).
        let users = Users::open(dir.path(), "admin", "other").unwrap();
        assert_eq!(users.list().len(), 2);
        users.verify("alice", "s3cret").unwrap();
        // Deleting the default user does not bring it back at the next start.
        users.delete("guest").unwrap();
        drop(users);
        let users = Users::open(dir.path(), "guest", "guest").unwrap();
        assert_eq!(
            users.list(),
            vec![("alice".to_owned(), vec![Tag::Monitoring])]
        );
    }

    #[test]
    fn plain_logins_are_checked_and_refusals_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let users = Users::open(dir.path(), "guest", "guest").unwrap();
        users.add("alice", "s3cret", &[]).unwrap();
        let guest_only_local = ["guest".to_owned()];
        let login = |mechanism: &str, data: &[u8], peer: IpAddr, anonymous: bool| {
            let rules = LoginRules {
                allow_anonymous: anonymous,
                anonymous_user: "guest",
                loopback_users: &guest_only_local,
            };
            authenticate(&users, rules, mechanism, data, peer, None)
        };
        assert_eq!(
            login("PLAIN", &plain("alice", "s3cret"), REMOTE, false),
            Ok(Principal::User("alice".to_owned()))
        );
        // Twice: the second time from the cache, same answer.
        assert!(login("PLAIN", &plain("alice", "s3cret"), REMOTE, false).is_ok());
        assert_eq!(
            login("PLAIN", &plain("alice", "wrong"), REMOTE, false),
            Err(Refusal::WrongPassword)
        );
        assert_eq!(
            login("PLAIN", &plain("mallory", "s3cret"), REMOTE, false),
            Err(Refusal::UnknownUser)
        );
        assert_eq!(
            Refusal::UnknownUser.client_reason(),
            Refusal::WrongPassword.client_reason(),
            "the client cannot tell an unknown user from a wrong password"
        );
        assert_eq!(
            login("PLAIN", &plain("guest", "guest"), REMOTE, false),
            Err(Refusal::NotLoopback)
        );
        assert!(login("PLAIN", &plain("guest", "guest"), LOCAL, false).is_ok());
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(login("PLAIN", &plain("guest", "guest"), mapped, false).is_ok());
        assert_eq!(plain_user(b"\0alice\0pw"), Some("alice"));
        assert_eq!(
            plain_user(b"alice\0pw"),
            None,
            "malformed: never log a field"
        );
        assert_eq!(
            login("PLAIN", b"no-nuls", LOCAL, false),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            login("ANONYMOUS", b"", LOCAL, false),
            Err(Refusal::AnonymousDisabled)
        );
        assert_eq!(
            login("ANONYMOUS", b"", LOCAL, true),
            Ok(Principal::Anonymous)
        );
        assert_eq!(
            login("ANONYMOUS", b"", REMOTE, true),
            Err(Refusal::NotLoopback),
            "anonymous acts as guest, and guest is loopback-only"
        );
        assert_eq!(
            login("SCRAM-SHA-1", b"", LOCAL, true),
            Err(Refusal::Mechanism("SCRAM-SHA-1".to_owned()))
        );
        // EXTERNAL: the user the TLS layer verified, if the broker has it.
        let external = |certificate: Option<&str>, data: &[u8], peer: IpAddr| {
            let rules = LoginRules {
                allow_anonymous: false,
                anonymous_user: "guest",
                loopback_users: &guest_only_local,
            };
            authenticate(&users, rules, "EXTERNAL", data, peer, certificate)
        };
        assert_eq!(
            external(Some("alice"), b"", REMOTE),
            Ok(Principal::User("alice".to_owned()))
        );
        assert_eq!(
            external(Some("alice"), b"alice", REMOTE),
            Ok(Principal::User("alice".to_owned()))
        );
        assert_eq!(
            external(Some("alice"), b"bob", REMOTE),
            Err(Refusal::Malformed),
            "an authorization identity other than the certificate's"
        );
        assert_eq!(external(None, b"", LOCAL), Err(Refusal::NoCertificate));
        assert_eq!(
            external(Some("mallory"), b"", LOCAL),
            Err(Refusal::UnknownUser)
        );
        assert_eq!(
            external(Some("guest"), b"", REMOTE),
            Err(Refusal::NotLoopback)
        );
        // A changed password takes effect at once, the cached one no longer works.
        users.set_password("alice", "n3w").unwrap();
        assert_eq!(
            login("PLAIN", &plain("alice", "s3cret"), REMOTE, false),
            Err(Refusal::WrongPassword)
        );
        assert!(login("PLAIN", &plain("alice", "n3w"), REMOTE, false).is_ok());
    }

    #[test]
    fn a_version_1_file_is_upgraded_with_full_permissions_on_the_default_vhost() {
        let dir = tempfile::tempdir().unwrap();
        let hash = hash_password("pw").unwrap();
        std::fs::write(
            dir.path().join(USERS_FILE),
            format!(r#"{{"version":1,"users":{{"old":{{"password_hash":"{hash}","tags":[]}}}}}}"#),
        )
        .unwrap();
        let users = Users::open(dir.path(), "guest", "guest").unwrap();
        assert_eq!(
            users.permissions(),
            vec![("old".to_owned(), "/".to_owned(), Permission::full())]
        );
        let text = std::fs::read_to_string(dir.path().join(USERS_FILE)).unwrap();
        assert!(text.contains("\"version\": 2"), "stored upgraded: {text}");
        users.verify("old", "pw").unwrap();
    }

    #[test]
    fn permissions_are_validated_and_bump_the_generation() {
        let dir = tempfile::tempdir().unwrap();
        let users = Users::open(dir.path(), "guest", "guest").unwrap();
        users.add("alice", "pw", &[]).unwrap();
        assert_eq!(users.grants("alice", DEFAULT_VHOST).1, None);
        let before = users.generation();
        let bad = |pattern: &str| Permission {
            configure: pattern.to_owned(),
            write: String::new(),
            read: String::new(),
        };
        assert!(matches!(
            users.set_permissions("alice", DEFAULT_VHOST, bad("(")),
            Err(AuthError::Invalid(_))
        ));
        assert!(
            matches!(
                users.set_permissions("alice", DEFAULT_VHOST, bad("a{1000}{1000}")),
                Err(AuthError::Invalid(_))
            ),
            "a pattern over the compiled-size limit"
        );
        assert!(matches!(
            users.set_permissions(
                "alice",
                DEFAULT_VHOST,
                bad(&"a".repeat(PERMISSION_PATTERN_BYTES_MAX + 1))
            ),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            users.set_permissions("alice", "bad\nvhost", Permission::full()),
            Err(AuthError::NoSuchVhost(_))
        ));
        assert!(matches!(
            users.set_permissions("nobody", DEFAULT_VHOST, Permission::full()),
            Err(AuthError::NoSuchUser(_))
        ));
        assert_eq!(users.generation(), before, "refused changes change nothing");
        users
            .set_permissions("alice", DEFAULT_VHOST, Permission::full())
            .unwrap();
        assert!(users.generation() > before);
        assert!(users.grants("alice", DEFAULT_VHOST).1.is_some());
        for n in 0..TOPIC_PERMISSIONS_MAX {
            users
                .set_topic_permissions(
                    "alice",
                    DEFAULT_VHOST,
                    &format!("x{n}"),
                    TopicPermission {
                        write: ".*".to_owned(),
                        read: ".*".to_owned(),
                    },
                )
                .unwrap();
        }
        assert!(matches!(
            users.set_topic_permissions(
                "alice",
                DEFAULT_VHOST,
                "one-more",
                TopicPermission {
                    write: ".*".to_owned(),
                    read: ".*".to_owned(),
                }
            ),
            Err(AuthError::Invalid(_))
        ));
        users
            .clear_topic_permissions("alice", DEFAULT_VHOST, None)
            .unwrap();
        assert!(users.topic_permissions().is_empty());
    }

    #[test]
    fn bad_names_passwords_and_duplicates_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let users = Users::open(dir.path(), "guest", "guest").unwrap();
        assert!(matches!(
            users.add("", "x", &[]),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            users.add("a\nb", "x", &[]),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            users.add("bob", "", &[]),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            users.add("guest", "x", &[]),
            Err(AuthError::UserExists(_))
        ));
        assert!(matches!(
            users.delete("nobody"),
            Err(AuthError::NoSuchUser(_))
        ));
        assert!(matches!(
            users.set_password("nobody", "x"),
            Err(AuthError::NoSuchUser(_))
        ));
        assert!("wizard".parse::<Tag>().is_err());
        // A damaged file stops the broker rather than letting everyone in.
        std::fs::write(dir.path().join(USERS_FILE), b"{not json").unwrap();
        assert!(matches!(
            Users::open(dir.path(), "guest", "guest"),
            Err(AuthError::File { .. })
        ));
    }
}
