//! Exchanges: the routing tables that decide which queues (and exchanges) a message reaches.

use crate::error::CoreError;
use crate::message::{HeaderValue, Headers, Message};
use crate::topic::TopicMatcher;
use crate::{FixedState, QueueId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// How an exchange routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ExchangeKind {
    /// To the bindings whose key equals the routing key.
    Direct,
    /// To every binding.
    Fanout,
    /// To the bindings whose pattern (`*`, `#`) matches the routing key.
    Topic,
    /// To the bindings whose header arguments match the message headers (`x-match` all/any).
    Headers,
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        })
    }
}

impl FromStr for ExchangeKind {
    type Err = CoreError;
    fn from_str(text: &str) -> Result<Self, CoreError> {
        match text {
            "direct" => Ok(ExchangeKind::Direct),
            "fanout" => Ok(ExchangeKind::Fanout),
            "topic" => Ok(ExchangeKind::Topic),
            "headers" => Ok(ExchangeKind::Headers),
            other => Err(CoreError::InvalidArgument {
                reason: format!("unknown exchange kind {other:?} (direct, fanout, topic, headers)"),
            }),
        }
    }
}

/// Properties fixed when an exchange is declared; a redeclare must repeat them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangeOptions {
    /// Survives a broker restart (its bindings to durable queues too).
    pub durable: bool,
    /// Deleted when its last binding is removed.
    pub auto_delete: bool,
    /// Cannot be published to directly, only reached through exchange-to-exchange bindings.
    pub internal: bool,
    /// Extra arguments, kept for future features.
    pub arguments: Headers,
}

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// A queue, by id (ids are never reused, so a deleted-and-redeclared queue is distinct).
    Queue(QueueId),
    /// Another exchange, by name.
    Exchange(Arc<str>),
}

/// How a headers binding compares its arguments to a message's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeadersMatch {
    all: bool,
    args: Vec<(String, HeaderValue)>,
}

impl HeadersMatch {
    /// Parses binding arguments as RabbitMQ does: `x-match` is `all` (default), `any`,
    /// `all-with-x` or `any-with-x`; other `x-` keys are ignored unless `-with-x` is given.
    pub(crate) fn parse(arguments: &Headers) -> Result<Self, CoreError> {
        let (all, with_x) = match arguments.get("x-match") {
            None => (true, false),
            Some(HeaderValue::Str(mode)) => match mode.as_str() {
                "all" => (true, false),
                "any" => (false, false),
                "all-with-x" => (true, true),
                "any-with-x" => (false, true),
                other => {
                    return Err(CoreError::InvalidArgument {
                        reason: format!(
                            "x-match must be all, any, all-with-x or any-with-x, not {other:?}"
                        ),
                    });
                }
            },
            Some(_) => {
                return Err(CoreError::InvalidArgument {
                    reason: "x-match must be a string".to_owned(),
                });
            }
        };
        let args = arguments
            .iter()
            .filter(|(key, _)| *key != "x-match" && (with_x || !key.starts_with("x-")))
            .map(|(key, value)| (key.to_owned(), value.clone()))
            .collect();
        Ok(HeadersMatch { all, args })
    }

    pub(crate) fn matches(&self, headers: &Headers) -> bool {
        let hit = |(key, value): &(String, HeaderValue)| headers.get(key) == Some(value);
        if self.all {
            self.args.iter().all(hit)
        } else {
            self.args.iter().any(hit)
        }
    }
}

/// The identity of a binding within one exchange: destination, key and arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BindingKey {
    pub destination: Destination,
    pub routing_key: Arc<str>,
    pub arguments: Headers,
}

#[derive(Debug, Clone)]
enum Router {
    Direct(HashMap<Arc<str>, Vec<Destination>, FixedState>),
    Fanout(Vec<Destination>),
    Topic(TopicMatcher<Destination>),
    Headers(Vec<(HeadersMatch, Destination)>),
}

/// An exchange and its bindings.
#[derive(Debug, Clone)]
pub(crate) struct Exchange {
    pub name: Arc<str>,
    pub kind: ExchangeKind,
    pub options: ExchangeOptions,
    pub builtin: bool,
    /// Every binding, ordered for deterministic iteration (destination, key) → argument sets.
    bindings: BTreeMap<(Destination, Arc<str>), Vec<Headers>>,
    n_bindings: usize,
    router: Router,
}

impl Exchange {
    pub(crate) fn new(
        name: Arc<str>,
        kind: ExchangeKind,
        options: ExchangeOptions,
        builtin: bool,
    ) -> Self {
        let router = match kind {
            ExchangeKind::Direct => Router::Direct(HashMap::default()),
            ExchangeKind::Fanout => Router::Fanout(Vec::new()),
            ExchangeKind::Topic => Router::Topic(TopicMatcher::new()),
            ExchangeKind::Headers => Router::Headers(Vec::new()),
        };
        Exchange {
            name,
            kind,
            options,
            builtin,
            bindings: BTreeMap::new(),
            n_bindings: 0,
            router,
        }
    }

    pub(crate) fn n_bindings(&self) -> usize {
        self.n_bindings
    }

    /// For a topic exchange, its matcher's cached binding count and the count found in the
    /// trie (the invariant checks compare them).
    pub(crate) fn topic_counts(&self) -> Option<(usize, usize)> {
        match &self.router {
            Router::Topic(matcher) => Some((matcher.len(), matcher.count_values())),
            _ => None,
        }
    }

    /// Breaks the cached binding counts on purpose (invariant check tests): the exchange's
    /// own, or its topic matcher's.
    #[cfg(test)]
    pub(crate) fn corrupt_counts(&mut self, topic: bool) {
        match &mut self.router {
            Router::Topic(matcher) if topic => matcher.corrupt_len(),
            _ => self.n_bindings += 1,
        }
    }

    pub(crate) fn has_binding(&self, key: &BindingKey) -> bool {
        self.bindings
            .get(&(key.destination.clone(), key.routing_key.clone()))
            .is_some_and(|sets| sets.contains(&key.arguments))
    }

    /// Adds a binding (the caller has checked it is new and valid).
    pub(crate) fn add_binding(&mut self, key: BindingKey) -> Result<(), CoreError> {
        let headers_match = match self.kind {
            ExchangeKind::Headers => Some(HeadersMatch::parse(&key.arguments)?),
            _ => None,
        };
        let first_for_key = !self
            .bindings
            .contains_key(&(key.destination.clone(), key.routing_key.clone()));
        match &mut self.router {
            Router::Direct(table) => {
                if first_for_key {
                    table
                        .entry(key.routing_key.clone())
                        .or_default()
                        .push(key.destination.clone());
                }
            }
            Router::Fanout(list) => {
                if !list.contains(&key.destination) {
                    list.push(key.destination.clone());
                }
            }
            Router::Topic(matcher) => {
                matcher.insert(&key.routing_key, key.destination.clone());
            }
            Router::Headers(list) => list.push((
                headers_match.expect("parsed for headers exchanges"),
                key.destination.clone(),
            )),
        }
        self.bindings
            .entry((key.destination, key.routing_key))
            .or_default()
            .push(key.arguments);
        self.n_bindings += 1;
        Ok(())
    }

    /// Removes a binding; returns whether it existed.
    pub(crate) fn remove_binding(&mut self, key: &BindingKey) -> bool {
        let map_key = (key.destination.clone(), key.routing_key.clone());
        let Some(sets) = self.bindings.get_mut(&map_key) else {
            return false;
        };
        let Some(pos) = sets.iter().position(|args| *args == key.arguments) else {
            return false;
        };
        sets.remove(pos);
        let key_still_bound = !sets.is_empty();
        if sets.is_empty() {
            self.bindings.remove(&map_key);
        }
        self.n_bindings -= 1;
        let still_bound_to_destination = self
            .bindings
            .range((key.destination.clone(), Arc::from(""))..)
            .next()
            .is_some_and(|((dest, _), _)| *dest == key.destination);
        match &mut self.router {
            Router::Direct(table) => {
                if !key_still_bound && let Some(list) = table.get_mut(&key.routing_key) {
                    list.retain(|dest| *dest != key.destination);
                    if list.is_empty() {
                        table.remove(&key.routing_key);
                    }
                }
            }
            Router::Fanout(list) => {
                if !still_bound_to_destination {
                    list.retain(|dest| *dest != key.destination);
                }
            }
            Router::Topic(matcher) => {
                if !key_still_bound {
                    matcher.remove(&key.routing_key, &key.destination);
                }
            }
            Router::Headers(list) => {
                let parsed =
                    HeadersMatch::parse(&key.arguments).expect("bound arguments parsed before");
                if let Some(pos) = list
                    .iter()
                    .position(|(rule, dest)| *rule == parsed && *dest == key.destination)
                {
                    list.remove(pos);
                }
            }
        }
        true
    }

    /// Every binding, in deterministic order.
    pub(crate) fn bindings(&self) -> Vec<BindingKey> {
        self.bindings
            .iter()
            .flat_map(|((destination, routing_key), sets)| {
                sets.iter().map(move |arguments| BindingKey {
                    destination: destination.clone(),
                    routing_key: routing_key.clone(),
                    arguments: arguments.clone(),
                })
            })
            .collect()
    }

    /// Calls `found` with the destination of every matching binding (possibly repeated).
    pub(crate) fn route(&mut self, message: &Message, mut found: impl FnMut(&Destination)) {
        match &mut self.router {
            Router::Direct(table) => {
                if let Some(list) = table.get(&*message.routing_key) {
                    list.iter().for_each(found);
                }
            }
            Router::Fanout(list) => list.iter().for_each(found),
            Router::Topic(matcher) => matcher.for_each_match(&message.routing_key, found),
            Router::Headers(list) => {
                for (rule, dest) in list.iter() {
                    if rule.matches(&message.headers) {
                        found(dest);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs.iter().map(|(key, value)| (*key, *value)).collect()
    }

    #[test]
    fn headers_match_all_any_and_x_prefixed_keys_like_rabbitmq() {
        let message = headers(&[("format", "pdf"), ("type", "report"), ("x-tenant", "a")]);
        let all = HeadersMatch::parse(&headers(&[
            ("x-match", "all"),
            ("format", "pdf"),
            ("type", "report"),
        ]))
        .unwrap();
        assert!(all.matches(&message));
        let all_miss =
            HeadersMatch::parse(&headers(&[("format", "pdf"), ("type", "log")])).unwrap();
        assert!(!all_miss.matches(&message), "x-match defaults to all");
        let any = HeadersMatch::parse(&headers(&[
            ("x-match", "any"),
            ("format", "zip"),
            ("type", "report"),
        ]))
        .unwrap();
        assert!(any.matches(&message));
        let any_empty = HeadersMatch::parse(&headers(&[("x-match", "any")])).unwrap();
        assert!(
            !any_empty.matches(&message),
            "any with no arguments matches nothing"
        );
        let all_empty = HeadersMatch::parse(&headers(&[("x-match", "all")])).unwrap();
        assert!(
            all_empty.matches(&message),
            "all with no arguments matches everything"
        );
        let ignores_x =
            HeadersMatch::parse(&headers(&[("x-tenant", "b"), ("format", "pdf")])).unwrap();
        assert!(
            ignores_x.matches(&message),
            "x- keys are ignored by plain all"
        );
        let with_x =
            HeadersMatch::parse(&headers(&[("x-match", "all-with-x"), ("x-tenant", "b")])).unwrap();
        assert!(!with_x.matches(&message));
        let any_with_x =
            HeadersMatch::parse(&headers(&[("x-match", "any-with-x"), ("x-tenant", "a")])).unwrap();
        assert!(any_with_x.matches(&message));
    }

    #[test]
    fn headers_match_compares_typed_values() {
        let message = Headers::new().with("n", 5i64);
        assert!(
            HeadersMatch::parse(&Headers::new().with("n", 5i64))
                .unwrap()
                .matches(&message)
        );
        assert!(
            !HeadersMatch::parse(&Headers::new().with("n", "5"))
                .unwrap()
                .matches(&message)
        );
    }

    #[test]
    fn bad_x_match_is_an_invalid_argument() {
        let err = HeadersMatch::parse(&headers(&[("x-match", "some")])).unwrap_err();
        assert!(matches!(err, CoreError::InvalidArgument { .. }), "{err}");
        let err = HeadersMatch::parse(&Headers::new().with("x-match", 1i64)).unwrap_err();
        assert!(matches!(err, CoreError::InvalidArgument { .. }), "{err}");
    }

    #[test]
    fn exchange_kind_round_trips_through_text() {
        for kind in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ] {
            assert_eq!(kind.to_string().parse::<ExchangeKind>().unwrap(), kind);
        }
        assert!(matches!(
            "x".parse::<ExchangeKind>(),
            Err(CoreError::InvalidArgument { .. })
        ));
    }
}
