//! Placeholder: collector component compatibility (replaced by the full module).
use std::collections::BTreeSet;

use crate::proto::AvailableComponents;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needed(BTreeSet<(String, String)>);

impl Needed {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub fn needed<'a>(_files: impl IntoIterator<Item = (&'a str, &'a str, &'a [u8])>) -> Needed {
    Needed::default()
}

pub fn missing(_needed: &Needed, _available: &AvailableComponents) -> Option<Vec<String>> {
    None
}
