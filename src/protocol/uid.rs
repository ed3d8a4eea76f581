//! Agent instance uids: 16 bytes on the wire, a lowercase UUID string everywhere users see them.
use std::fmt;
use std::str::FromStr;

/// The 16-byte `instance_uid` of an agent.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(pub [u8; 16]);

impl Uid {
    /// A new UUIDv7, as the specification recommends for instance uids.
    pub fn new_v7() -> Self {
        Uid(*uuid::Uuid::now_v7().as_bytes())
    }

    /// The uid of a wire `instance_uid`, if it has the required 16 bytes.
    pub fn from_wire(bytes: &[u8]) -> Option<Self> {
        <[u8; 16]>::try_from(bytes).ok().map(Uid)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn to_wire(self) -> bytes::Bytes {
        bytes::Bytes::copy_from_slice(&self.0)
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_bytes(self.0).hyphenated().fmt(f)
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uid({self})")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid instance uid {0:?}: expected a UUID such as 0193a5c4-7d2e-7c3a-9b1f-2a4c6e8f0a1b")]
pub struct ParseUidError(String);

impl FromStr for Uid {
    type Err = ParseUidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(|u| Uid(*u.as_bytes())).map_err(|_| ParseUidError(s.to_owned()))
    }
}

impl serde::Serialize for Uid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Uid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_lowercase_uuid_and_parses_back() {
        let uid = Uid([
            0x01, 0x93, 0xA5, 0xC4, 0x7D, 0x2E, 0x7C, 0x3A, 0x9B, 0x1F, 0x2A, 0x4C, 0x6E, 0x8F, 0x0A, 0x1B,
        ]);
        assert_eq!(uid.to_string(), "0193a5c4-7d2e-7c3a-9b1f-2a4c6e8f0a1b");
        assert_eq!("0193A5C4-7D2E-7C3A-9B1F-2A4C6E8F0A1B".parse::<Uid>().unwrap(), uid);
        assert!("not-a-uid".parse::<Uid>().is_err());
    }

    #[test]
    fn only_16_bytes_make_a_uid() {
        assert!(Uid::from_wire(&[1; 16]).is_some());
        assert!(Uid::from_wire(&[1; 15]).is_none());
        assert!(Uid::from_wire(b"01ARZ3NDEKTSV4RRFFQ69G5FAV").is_none()); // a 26-char ULID
        assert!(Uid::from_wire(&[]).is_none());
    }

    #[test]
    fn new_uids_are_version_7() {
        let uid = Uid::new_v7();
        assert_eq!(uuid::Uuid::from_bytes(uid.0).get_version_num(), 7);
    }
}
