//! Online administration (protocol 1.2): users and their permissions, and (protocol 1.3)
//! virtual hosts and users' own limits, for a client whose user has the `administrator` tag. The broker answers
//! `AccessRefused` to anyone else, and [`ClientError::NotSupported`] is returned, without
//! sending anything, by a broker older than the minor that defines the request.

use crate::client::{Client, unexpected};
use crate::error::ClientError;
use wharf_protocol::{
    MINOR_ADMIN, MINOR_VHOSTS, PermissionInfo, Request, Response, TopicPermissionInfo, UserInfo,
    UserLimits, UserLimitsInfo, VhostInfo, VhostLimits,
};

impl Client {
    /// Sends an administration request answered by `Done`.
    async fn administer(
        &self,
        operation: &'static str,
        request: Request,
    ) -> Result<(), ClientError> {
        let shared = self.shared();
        shared.require_minor(operation, request.minor_required())?;
        match shared.request(request).await? {
            Response::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Adds a user with `password` and `tags` (`administrator`, `monitoring`, `management`,
    /// `policymaker`), without permissions. `PreconditionFailed` if it exists.
    pub async fn add_user(
        &self,
        name: &str,
        password: &str,
        tags: &[&str],
    ) -> Result<(), ClientError> {
        let request = Request::AddUser {
            name: name.to_owned(),
            password: password.into(),
            tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
        };
        self.administer("add_user", request).await
    }

    /// Deletes a user and its permissions. `NotFound` if there is none.
    pub async fn delete_user(&self, name: &str) -> Result<(), ClientError> {
        let request = Request::DeleteUser {
            name: name.to_owned(),
        };
        self.administer("delete_user", request).await
    }

    /// Sets a user's password.
    pub async fn change_password(&self, name: &str, password: &str) -> Result<(), ClientError> {
        let request = Request::ChangePassword {
            name: name.to_owned(),
            password: password.into(),
        };
        self.administer("change_password", request).await
    }

    /// Sets a user's tags (replacing them).
    pub async fn set_user_tags(&self, name: &str, tags: &[&str]) -> Result<(), ClientError> {
        let request = Request::SetUserTags {
            name: name.to_owned(),
            tags: tags.iter().map(|tag| (*tag).to_owned()).collect(),
        };
        self.administer("set_user_tags", request).await
    }

    /// Every user and its tags.
    pub async fn list_users(&self) -> Result<Vec<UserInfo>, ClientError> {
        let shared = self.shared();
        shared.require_minor("list_users", MINOR_ADMIN)?;
        match shared.request(Request::ListUsers).await? {
            Response::Users(users) => Ok(users),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets a user's permissions in a virtual host: RabbitMQ's configure, write and read
    /// regular expressions (`.*`: everything, `""`: nothing). `InvalidArgument` for a pattern
    /// that does not compile.
    pub async fn set_permissions(&self, permission: PermissionInfo) -> Result<(), ClientError> {
        self.administer("set_permissions", Request::SetPermissions(permission))
            .await
    }

    /// Removes a user's permissions (and topic permissions) in a virtual host.
    pub async fn clear_permissions(&self, user: &str, vhost: &str) -> Result<(), ClientError> {
        let request = Request::ClearPermissions {
            user: user.to_owned(),
            vhost: vhost.to_owned(),
        };
        self.administer("clear_permissions", request).await
    }

    /// The permissions in a virtual host.
    pub async fn list_permissions(&self, vhost: &str) -> Result<Vec<PermissionInfo>, ClientError> {
        let shared = self.shared();
        shared.require_minor("list_permissions", MINOR_ADMIN)?;
        let request = Request::ListPermissions {
            vhost: vhost.to_owned(),
        };
        match shared.request(request).await? {
            Response::Permissions(permissions) => Ok(permissions),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets a user's topic permissions on a topic exchange.
    pub async fn set_topic_permissions(
        &self,
        permission: TopicPermissionInfo,
    ) -> Result<(), ClientError> {
        self.administer(
            "set_topic_permissions",
            Request::SetTopicPermissions(permission),
        )
        .await
    }

    /// Removes a user's topic permissions on one exchange (`Some`) or all (`None`).
    pub async fn clear_topic_permissions(
        &self,
        user: &str,
        vhost: &str,
        exchange: Option<&str>,
    ) -> Result<(), ClientError> {
        let request = Request::ClearTopicPermissions {
            user: user.to_owned(),
            vhost: vhost.to_owned(),
            exchange: exchange.map(str::to_owned),
        };
        self.administer("clear_topic_permissions", request).await
    }

    /// The topic permissions in a virtual host.
    pub async fn list_topic_permissions(
        &self,
        vhost: &str,
    ) -> Result<Vec<TopicPermissionInfo>, ClientError> {
        let shared = self.shared();
        shared.require_minor("list_topic_permissions", MINOR_ADMIN)?;
        let request = Request::ListTopicPermissions {
            vhost: vhost.to_owned(),
        };
        match shared.request(request).await? {
            Response::TopicPermissions(permissions) => Ok(permissions),
            other => Err(unexpected(&other)),
        }
    }

    /// Adds a virtual host with its own `limits` (`VhostLimits::default()`: none). Users
    /// need permissions in it before they can connect to it. `PreconditionFailed` if it
    /// exists.
    pub async fn add_vhost(&self, name: &str, limits: VhostLimits) -> Result<(), ClientError> {
        let request = Request::AddVhost {
            name: name.to_owned(),
            limits,
        };
        self.administer("add_vhost", request).await
    }

    /// Deletes a virtual host with everything in it (queues, exchanges, permissions).
    /// `NotFound` if there is none.
    pub async fn delete_vhost(&self, name: &str) -> Result<(), ClientError> {
        let request = Request::DeleteVhost {
            name: name.to_owned(),
        };
        self.administer("delete_vhost", request).await
    }

    /// Every virtual host, its limits and its current connections and queues.
    pub async fn list_vhosts(&self) -> Result<Vec<VhostInfo>, ClientError> {
        let shared = self.shared();
        shared.require_minor("list_vhosts", MINOR_VHOSTS)?;
        match shared.request(Request::ListVhosts).await? {
            Response::Vhosts(vhosts) => Ok(vhosts),
            other => Err(unexpected(&other)),
        }
    }

    /// Sets a virtual host's limits, replacing them (a `None` field lifts that limit).
    /// Lowering a limit below the current usage refuses new connections or queues; it closes
    /// or deletes nothing.
    pub async fn set_vhost_limits(
        &self,
        name: &str,
        limits: VhostLimits,
    ) -> Result<(), ClientError> {
        let request = Request::SetVhostLimits {
            name: name.to_owned(),
            limits,
        };
        self.administer("set_vhost_limits", request).await
    }

    /// Sets a user's own limits, replacing both (a `None` field: no limit of the user's own;
    /// the broker's `connections_per_user_max` still applies). `max_connections` caps the
    /// user's open connections, `max_queues` the queues it has declared that still exist.
    /// Lowering a limit below the current usage closes or deletes nothing. `NotFound` if the
    /// user does not exist.
    pub async fn set_user_limits(&self, user: &str, limits: UserLimits) -> Result<(), ClientError> {
        let request = Request::SetUserLimits {
            user: user.to_owned(),
            limits,
        };
        self.administer("set_user_limits", request).await
    }

    /// Every user and its own limits (both `None` for a user without any), sorted by name.
    pub async fn list_user_limits(&self) -> Result<Vec<UserLimitsInfo>, ClientError> {
        let shared = self.shared();
        shared.require_minor("list_user_limits", MINOR_VHOSTS)?;
        match shared.request(Request::ListUserLimits).await? {
            Response::UserLimits(users) => Ok(users),
            other => Err(unexpected(&other)),
        }
    }
}
