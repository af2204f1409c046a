//! Wharf core (being written).
