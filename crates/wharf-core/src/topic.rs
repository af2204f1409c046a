//! Topic routing: AMQP topic patterns compiled into a trie and matched by walking it as an NFA.
//!
//! Keys and patterns are dot-separated words; in a pattern `*` matches exactly one word and `#`
//! zero or more. The empty string is one empty word. Matching a key costs
//! O(words × trie nodes alive at once), independent of how many bindings the exchange holds,
//! and never exponential: each step keeps a deduplicated set of live nodes, so patterns such as
//! `#.a.#.a.#` cannot blow up.

use std::collections::HashMap;

const ROOT: u32 = 0;

#[derive(Debug, Clone)]
struct Node<T> {
    words: HashMap<Box<str>, u32>,
    star: Option<u32>,
    hash: Option<u32>,
    /// Reached through a `#` edge: it may consume any number of further words.
    is_hash: bool,
    values: Vec<T>,
    parent: u32,
    edge: Edge,
}

#[derive(Debug, Clone)]
enum Edge {
    Root,
    Word(Box<str>),
    Star,
    Hash,
}

impl<T> Node<T> {
    fn new(parent: u32, edge: Edge) -> Self {
        Node {
            words: HashMap::new(),
            star: None,
            hash: None,
            is_hash: matches!(edge, Edge::Hash),
            values: Vec::new(),
            parent,
            edge,
        }
    }

    fn is_empty(&self) -> bool {
        self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
            && self.values.is_empty()
    }
}

/// A set of `(pattern, value)` bindings that finds every value whose pattern matches a key.
#[derive(Debug, Clone)]
pub struct TopicMatcher<T> {
    nodes: Vec<Node<T>>,
    free: Vec<u32>,
    /// Scratch for matching, kept to avoid allocating per message.
    stamps: Vec<u32>,
    generation: u32,
    current: Vec<u32>,
    next: Vec<u32>,
    n_values: usize,
}

impl<T> Default for TopicMatcher<T> {
    fn default() -> Self {
        TopicMatcher {
            nodes: vec![Node::new(ROOT, Edge::Root)],
            free: Vec::new(),
            stamps: vec![0],
            generation: 0,
            current: Vec::new(),
            next: Vec::new(),
            n_values: 0,
        }
    }
}

/// Splits a pattern into words, collapsing runs of `#` (`#.#` means the same as `#`).
fn pattern_words(pattern: &str) -> Vec<&str> {
    let mut words: Vec<&str> = Vec::new();
    for word in pattern.split('.') {
        if word == "#" && words.last() == Some(&"#") {
            continue;
        }
        words.push(word);
    }
    words
}

impl<T: PartialEq> TopicMatcher<T> {
    /// An empty matcher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of `(pattern, value)` bindings held.
    pub fn len(&self) -> usize {
        self.n_values
    }

    /// True when no binding is held.
    pub fn is_empty(&self) -> bool {
        self.n_values == 0
    }

    /// The bindings held, counted in the trie (the invariant checks compare it with
    /// [`TopicMatcher::len`]); O(trie nodes).
    pub(crate) fn count_values(&self) -> usize {
        self.nodes.iter().map(|node| node.values.len()).sum()
    }

    /// Breaks the cached binding count on purpose (invariant check tests).
    #[cfg(test)]
    pub(crate) fn corrupt_len(&mut self) {
        self.n_values += 1;
    }

    fn alloc(&mut self, parent: u32, edge: Edge) -> u32 {
        let node = Node::new(parent, edge);
        if let Some(idx) = self.free.pop() {
            self.nodes[idx as usize] = node;
            idx
        } else {
            self.nodes.push(node);
            self.stamps.push(0);
            u32::try_from(self.nodes.len() - 1).expect("topic trie nodes fit in u32")
        }
    }

    /// Adds `value` under `pattern`; returns false if that exact pair was already present.
    pub fn insert(&mut self, pattern: &str, value: T) -> bool {
        let mut node_idx = ROOT;
        for word in pattern_words(pattern) {
            let existing = match word {
                "*" => self.nodes[node_idx as usize].star,
                "#" => self.nodes[node_idx as usize].hash,
                _ => self.nodes[node_idx as usize].words.get(word).copied(),
            };
            node_idx = match existing {
                Some(child) => child,
                None => {
                    let (edge, child) = match word {
                        "*" => (Edge::Star, None),
                        "#" => (Edge::Hash, None),
                        _ => (Edge::Word(word.into()), Some(word)),
                    };
                    let new_idx = self.alloc(node_idx, edge);
                    let parent = &mut self.nodes[node_idx as usize];
                    match (word, child) {
                        ("*", _) => parent.star = Some(new_idx),
                        ("#", _) => parent.hash = Some(new_idx),
                        (_, Some(word)) => {
                            parent.words.insert(word.into(), new_idx);
                        }
                        _ => unreachable!("every word kind handled"),
                    }
                    new_idx
                }
            };
        }
        let values = &mut self.nodes[node_idx as usize].values;
        if values.contains(&value) {
            return false;
        }
        values.push(value);
        self.n_values += 1;
        true
    }

    fn find(&self, pattern: &str) -> Option<u32> {
        let mut node_idx = ROOT;
        for word in pattern_words(pattern) {
            let node = &self.nodes[node_idx as usize];
            node_idx = match word {
                "*" => node.star?,
                "#" => node.hash?,
                _ => *node.words.get(word)?,
            };
        }
        Some(node_idx)
    }

    /// Removes `value` from `pattern`; returns whether it was present. Emptied trie branches
    /// are freed, so bind/unbind churn does not grow memory.
    pub fn remove(&mut self, pattern: &str, value: &T) -> bool {
        let Some(mut node_idx) = self.find(pattern) else {
            return false;
        };
        let values = &mut self.nodes[node_idx as usize].values;
        let Some(pos) = values.iter().position(|existing| existing == value) else {
            return false;
        };
        values.swap_remove(pos);
        self.n_values -= 1;
        while node_idx != ROOT && self.nodes[node_idx as usize].is_empty() {
            let parent_idx = self.nodes[node_idx as usize].parent;
            let edge = std::mem::replace(&mut self.nodes[node_idx as usize].edge, Edge::Root);
            let parent = &mut self.nodes[parent_idx as usize];
            match edge {
                Edge::Word(word) => {
                    parent.words.remove(&word);
                }
                Edge::Star => parent.star = None,
                Edge::Hash => parent.hash = None,
                Edge::Root => unreachable!("only the root has a root edge"),
            }
            self.free.push(node_idx);
            node_idx = parent_idx;
        }
        true
    }

    fn add_live(&mut self, node_idx: u32) {
        // A node reached is live, and so is its `#` child (which may match zero words),
        // and that child's `#` child is impossible (runs of `#` are collapsed).
        let mut idx = node_idx;
        loop {
            if self.stamps[idx as usize] == self.generation {
                return;
            }
            self.stamps[idx as usize] = self.generation;
            self.next.push(idx);
            match self.nodes[idx as usize].hash {
                Some(hash_child) => idx = hash_child,
                None => return,
            }
        }
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.stamps.iter_mut().for_each(|stamp| *stamp = 0);
            self.generation = 1;
        }
    }

    /// Calls `found` with every value whose pattern matches `key` (a value bound under two
    /// matching patterns is reported twice).
    pub fn for_each_match(&mut self, key: &str, mut found: impl FnMut(&T)) {
        if self.n_values == 0 {
            return;
        }
        self.current.clear();
        self.next.clear();
        self.bump_generation();
        self.add_live(ROOT);
        std::mem::swap(&mut self.current, &mut self.next);
        for word in key.split('.') {
            self.bump_generation();
            self.next.clear();
            let mut cursor = 0;
            while cursor < self.current.len() {
                let node_idx = self.current[cursor];
                cursor += 1;
                let node = &self.nodes[node_idx as usize];
                let by_word = node.words.get(word).copied();
                let by_star = node.star;
                let stays = node.is_hash;
                if let Some(child) = by_word {
                    self.add_live(child);
                }
                if let Some(child) = by_star {
                    self.add_live(child);
                }
                if stays {
                    self.add_live(node_idx);
                }
            }
            std::mem::swap(&mut self.current, &mut self.next);
            if self.current.is_empty() {
                return;
            }
        }
        for &node_idx in &self.current {
            for value in &self.nodes[node_idx as usize].values {
                found(value);
            }
        }
    }
}

/// The obviously-correct reference matcher (exponential in the worst case; for tests and
/// documentation only).
pub fn topic_matches_naive(pattern: &str, key: &str) -> bool {
    fn go(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| go(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && go(rest, &key[1..]),
            Some((word, rest)) => key.first() == Some(word) && go(rest, &key[1..]),
        }
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = key.split('.').collect();
    go(&pattern, &key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matched(matcher: &mut TopicMatcher<u32>, key: &str) -> Vec<u32> {
        let mut out = Vec::new();
        matcher.for_each_match(key, |value| out.push(*value));
        out.sort_unstable();
        out.dedup();
        out
    }

    #[test]
    fn amqp_examples_match_as_documented() {
        let cases = [
            ("*.orange.*", "quick.orange.rabbit", true),
            ("*.*.rabbit", "quick.orange.rabbit", true),
            ("lazy.#", "lazy.orange.elephant", true),
            ("lazy.#", "lazy", true),
            ("*.orange.*", "quick.orange.male.rabbit", false),
            ("*.*.rabbit", "orange", false),
            ("#", "", true),
            ("#", "a.b.c", true),
            ("*", "", true),
            ("a.*", "a", false),
            ("#.a", "a", true),
            ("a.#.b", "a.b", true),
            ("a.#.b", "a.x.y.b", true),
            ("a.#.b", "a.x.y.c", false),
            ("", "", true),
            ("", "a", false),
        ];
        for (pattern, key, expect) in cases {
            assert_eq!(
                topic_matches_naive(pattern, key),
                expect,
                "naive {pattern} vs {key}"
            );
            let mut matcher = TopicMatcher::new();
            matcher.insert(pattern, 1u32);
            assert_eq!(
                !matched(&mut matcher, key).is_empty(),
                expect,
                "trie {pattern} vs {key}"
            );
        }
    }

    #[test]
    fn pathological_hash_patterns_match_in_linear_steps() {
        let mut matcher = TopicMatcher::new();
        let pattern = ["#", "a"].repeat(40).join(".");
        matcher.insert(&pattern, 7u32);
        let key = vec!["a"; 120].join(".");
        assert_eq!(matched(&mut matcher, &key), vec![7]);
        let key_miss = format!("{}.b", vec!["a"; 120].join("."));
        assert!(matched(&mut matcher, &key_miss).is_empty());
    }

    #[test]
    fn remove_frees_branches_and_reuses_nodes() {
        let mut matcher = TopicMatcher::new();
        for round in 0..100u32 {
            let pattern = format!("a.{round}.#.*");
            assert!(matcher.insert(&pattern, round));
            assert!(
                !matcher.insert(&pattern, round),
                "duplicate insert is a no-op"
            );
            assert!(matcher.remove(&pattern, &round));
            assert!(!matcher.remove(&pattern, &round));
        }
        assert!(matcher.is_empty());
        assert!(
            matcher.nodes.len() <= 8,
            "nodes were recycled: {}",
            matcher.nodes.len()
        );
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("c".to_owned()),
            Just(String::new())
        ]
    }
    fn pattern_word() -> impl Strategy<Value = String> {
        prop_oneof![3 => word(), 1 => Just("*".to_owned()), 1 => Just("#".to_owned())]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn trie_matcher_agrees_with_naive_matcher(
            patterns in prop::collection::vec(prop::collection::vec(pattern_word(), 1..6), 1..20),
            keys in prop::collection::vec(prop::collection::vec(word(), 1..7), 1..20),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..5),
        ) {
            let patterns: Vec<String> = patterns.iter().map(|words| words.join(".")).collect();
            let mut matcher = TopicMatcher::new();
            for (idx, pattern) in patterns.iter().enumerate() {
                matcher.insert(pattern, idx as u32);
            }
            let mut alive: Vec<bool> = vec![true; patterns.len()];
            for index in removed {
                let idx = index.index(patterns.len());
                prop_assert_eq!(matcher.remove(&patterns[idx], &(idx as u32)), alive[idx]);
                alive[idx] = false;
            }
            for key in keys {
                let key = key.join(".");
                let expected: Vec<u32> = patterns.iter().enumerate()
                    .filter(|(idx, pattern)| alive[*idx] && topic_matches_naive(pattern, &key))
                    .map(|(idx, _)| idx as u32)
                    .collect();
                prop_assert_eq!(matched(&mut matcher, &key), expected, "key {:?}", key);
            }
        }
    }
}
