//! Where callbacks may go. A CapabilitySlot's author picks its callback URL, and the operator
//! POSTs there from inside the cluster: left open, any tenant could make it talk to the
//! operator's own host (loopback), the node's metadata service (link-local), or the Kubernetes
//! API server, and read from the slot's status what answered. So callbacks to those are
//! refused unless the operator's admin allows them (`--callback-allow`). Private ranges
//! (10/8, 172.16/12, 192.168/16, fc00::/7) stay allowed: in-cluster Services live there.
//!
//! The policy is checked twice: on the URL when a slot is published (a literal address or a
//! refused name: the slot is not Ready, nothing is sent), and on every address a name resolves
//! to when a callback connects ([`Resolver`]), so a name that resolves, or later rebinds, to a
//! refused address is refused too.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

/// The cloud metadata addresses outside link-local (169.254.169.254 is link-local already).
const METADATA: [IpAddr; 2] = [
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)), // AWS, IPv6
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),                  // Alibaba Cloud
];

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is a loopback address")]
    Loopback(IpAddr),
    #[error("{0} is a link-local address")]
    LinkLocal(IpAddr),
    #[error("{0} is a cloud metadata address")]
    Metadata(IpAddr),
    #[error("{0} is an unspecified address")]
    Unspecified(IpAddr),
    #[error("{0} is a broadcast or multicast address")]
    Broadcast(IpAddr),
    #[error("{0:?} names the local host")]
    Localhost(String),
    #[error("{0} is the Kubernetes API server")]
    ApiServer(String),
    #[error("the URL has no host")]
    NoHost,
    #[error("the URL cannot be parsed: {0}")]
    InvalidUrl(String),
}

/// The error a callback's connection fails with when every address of its host is refused.
/// It says nothing of what is there: that is what a tenant must not learn.
#[derive(Debug, thiserror::Error)]
#[error("refused by the callback egress policy")]
pub struct EgressRefused;

/// One `--callback-allow` entry: a CIDR or an address (`127.0.0.1/32`, `::1`), a host name
/// (`callbacks.example.com`), or every name under a domain (`*.example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    Net(IpNet),
    Host(String),
    /// `*.example.com`: stored as `.example.com`.
    Domain(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is neither a CIDR, an IP address nor a host name")]
pub struct InvalidAllow(String);

impl FromStr for Allow {
    type Err = InvalidAllow;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if let Ok(net) = t.parse::<IpNet>() {
            return Ok(Allow::Net(net.trunc()));
        }
        if let Ok(ip) = t.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(Allow::Net(IpNet::from(normalize(ip))));
        }
        let name = t.trim_end_matches('.').to_ascii_lowercase();
        let (domain, bare) = match name.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, name.as_str()),
        };
        let label_ok = |l: &str| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(label_ok) {
            return Err(InvalidAllow(s.to_owned()));
        }
        Ok(if domain { Allow::Domain(format!(".{bare}")) } else { Allow::Host(bare.to_owned()) })
    }
}

impl std::fmt::Display for Allow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Allow::Net(n) => write!(f, "{n}"),
            Allow::Host(h) => f.write_str(h),
            Allow::Domain(d) => write!(f, "*{d}"),
        }
    }
}

/// The callback egress policy. [`Default`] is the strict one: nothing allowed beyond what is
/// allowed by default, and the API server known from `KUBERNETES_SERVICE_HOST` and the
/// `kubernetes.default.svc` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    allow: Vec<Allow>,
    /// The API server's host names (lowercase) and addresses.
    api_names: Vec<String>,
    api_addrs: Vec<IpAddr>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

/// An address in its plain form: IPv4-mapped (`::ffff:127.0.0.1`), IPv4-compatible
/// (`::127.0.0.1`) and NAT64 (`64:ff9b::127.0.0.1`) forms of an IPv4 address become that
/// address, so that they are judged as what they reach.
pub fn normalize(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let embedded = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    // IPv4-compatible (deprecated, ::a.b.c.d), except :: and ::1, which are themselves.
    if s[..6] == [0; 6] && !v6.is_unspecified() && !v6.is_loopback() {
        return IpAddr::V4(embedded());
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(embedded());
    }
    ip
}

/// Why `ip` is refused by default, if it is.
fn refused_class(ip: IpAddr) -> Option<Refusal> {
    let original = ip;
    let ip = normalize(ip);
    if METADATA.contains(&ip) {
        return Some(Refusal::Metadata(original));
    }
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some(Refusal::Loopback(original))
            } else if v4.is_link_local() {
                Some(Refusal::LinkLocal(original))
            } else if v4.octets()[0] == 0 {
                Some(Refusal::Unspecified(original)) // 0.0.0.0/8, "this network"
            } else if v4.is_broadcast() || v4.is_multicast() {
                Some(Refusal::Broadcast(original))
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some(Refusal::Loopback(original))
            } else if v6.is_unspecified() {
                Some(Refusal::Unspecified(original))
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some(Refusal::LinkLocal(original))
            } else if v6.is_multicast() {
                Some(Refusal::Broadcast(original))
            } else {
                None
            }
        }
    }
}

fn is_localhost(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost")
}

/// `name` lowercased, without a trailing dot, as DNS compares names.
fn canonical(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl EgressPolicy {
    /// The strict policy plus `allow`; the API server is known from `KUBERNETES_SERVICE_HOST`
    /// (in a pod) and the `kubernetes.default.svc` names. Add the host the operator's own
    /// Kubernetes client talks to with [`EgressPolicy::with_api_server`].
    pub fn new(allow: Vec<Allow>) -> Self {
        let mut policy = Self { allow, api_names: Vec::new(), api_addrs: Vec::new() };
        if let Ok(host) = std::env::var("KUBERNETES_SERVICE_HOST") {
            policy = policy.with_api_server(&host);
        }
        policy
    }

    /// Refuses `host` (a name or an address, as in a URL) as the API server.
    pub fn with_api_server(mut self, host: &str) -> Self {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => self.api_addrs.push(normalize(ip)),
            Err(_) if !host.is_empty() => self.api_names.push(canonical(host)),
            Err(_) => {}
        }
        self
    }

    /// Also refuses the addresses the API server's names resolve to now (best effort: a name
    /// that does not resolve is still refused by name).
    pub async fn resolve_api_server(mut self) -> Self {
        for name in self.api_names.clone() {
            if let Ok(addrs) = tokio::net::lookup_host((name.as_str(), 0)).await {
                self.api_addrs.extend(addrs.map(|a| normalize(a.ip())));
            }
        }
        self.api_addrs.sort();
        self.api_addrs.dedup();
        self
    }

    pub fn allowed(&self) -> &[Allow] {
        &self.allow
    }

    fn allows_name(&self, name: &str) -> bool {
        self.allow.iter().any(|a| match a {
            Allow::Host(h) => h == name,
            Allow::Domain(d) => name.ends_with(d.as_str()),
            Allow::Net(_) => false,
        })
    }

    fn allows_addr(&self, ip: IpAddr) -> bool {
        let plain = normalize(ip);
        self.allow.iter().any(|a| matches!(a, Allow::Net(n) if n.contains(&ip) || n.contains(&plain)))
    }

    /// Checks a host name (not an address) before it is resolved.
    pub fn check_name(&self, name: &str) -> Result<(), Refusal> {
        let name = canonical(name);
        if self.allows_name(&name) {
            return Ok(());
        }
        if is_localhost(&name) {
            return Err(Refusal::Localhost(name));
        }
        let kubernetes_default = name == "kubernetes.default" || name.starts_with("kubernetes.default.");
        if kubernetes_default || self.api_names.contains(&name) {
            return Err(Refusal::ApiServer(name));
        }
        Ok(())
    }

    /// Checks one address; `name` is the host name it was resolved from, if any (a name on
    /// the allow list vouches for its addresses).
    pub fn check_addr(&self, name: Option<&str>, ip: IpAddr) -> Result<(), Refusal> {
        if name.is_some_and(|n| self.allows_name(&canonical(n))) || self.allows_addr(ip) {
            return Ok(());
        }
        if let Some(why) = refused_class(ip) {
            return Err(why);
        }
        if self.api_addrs.contains(&normalize(ip)) {
            return Err(Refusal::ApiServer(ip.to_string()));
        }
        Ok(())
    }

    /// The static check of a callback URL: its host, a name or an address. A name that passes
    /// is checked again, address by address, when it is resolved.
    pub fn check_url(&self, url: &str) -> Result<(), Refusal> {
        let url = reqwest::Url::parse(url).map_err(|e| Refusal::InvalidUrl(e.to_string()))?;
        // The parser has normalized the host: IPv6 in brackets, IPv4 in dotted decimal
        // (`http://2130706433/` is 127.0.0.1).
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or(Refusal::NoHost)?;
        match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(ip) => self.check_addr(None, ip),
            Err(_) => self.check_name(host),
        }
    }

    /// The addresses `host` resolved to that the policy allows; none is [`EgressRefused`].
    pub fn filter(
        &self,
        host: &str,
        resolved: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<Vec<SocketAddr>, EgressRefused> {
        self.check_name(host).map_err(|_| EgressRefused)?;
        let allowed: Vec<SocketAddr> =
            resolved.into_iter().filter(|a| self.check_addr(Some(host), a.ip()).is_ok()).collect();
        if allowed.is_empty() { Err(EgressRefused) } else { Ok(allowed) }
    }
}

/// The callback client's DNS resolver: resolves with the system resolver, then keeps only
/// the addresses the policy allows; none left fails the connection with [`EgressRefused`].
/// (reqwest does not call a resolver for a literal address: those are checked on the URL.)
pub(crate) struct Resolver(pub(crate) Arc<EgressPolicy>);

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // A refused name is not even looked up.
            policy.check_name(&host).map_err(|_| EgressRefused)?;
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let allowed = policy.filter(&host, resolved)?;
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether a request failed because the policy refused it (see [`EgressRefused`]).
pub fn is_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<EgressRefused>() {
            return true;
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn strict() -> EgressPolicy {
        EgressPolicy { allow: vec![], api_names: vec![], api_addrs: vec![] }
    }

    fn allowing(entries: &[&str]) -> EgressPolicy {
        EgressPolicy { allow: entries.iter().map(|e| e.parse().unwrap()).collect(), ..strict() }
    }

    // Link-local and metadata addresses appear only here: no test ever sends to them.
    #[test]
    fn every_refused_class_is_refused() {
        let p = strict();
        for (addr, class) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("::1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("169.254.0.1", "link-local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fd00:ec2::254", "metadata"),
            ("100.100.100.200", "metadata"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("239.1.2.3", "multicast"),
            ("ff02::1", "multicast"),
        ] {
            let got = p.check_addr(None, ip(addr));
            assert!(got.is_err(), "{addr} ({class}) is allowed");
            assert!(p.check_url(&format!("http://{}/x", url_host(addr))).is_err(), "URL with {addr}");
        }
    }

    fn url_host(addr: &str) -> String {
        if addr.contains(':') { format!("[{addr}]:8080") } else { format!("{addr}:8080") }
    }

    #[test]
    fn private_and_public_addresses_are_allowed() {
        let p = strict();
        for addr in
            ["10.0.0.7", "172.16.3.4", "192.168.1.1", "100.64.0.1", "8.8.8.8", "fd12::1", "2001:db8::1"]
        {
            assert_eq!(p.check_addr(None, ip(addr)), Ok(()), "{addr}");
        }
        assert_eq!(p.check_url("http://profiles.observability.svc:8080/opamp"), Ok(()));
        assert_eq!(p.check_url("https://10.96.3.4/x"), Ok(()));
    }

    #[test]
    fn ipv4_forms_inside_ipv6_are_judged_as_ipv4() {
        let p = strict();
        for addr in [
            "::ffff:127.0.0.1",
            "::ffff:7f00:1",
            "::127.0.0.1",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::127.0.0.1",
            "::ffff:0.0.0.0",
        ] {
            assert!(p.check_addr(None, ip(addr)).is_err(), "{addr}");
            assert!(p.check_url(&format!("http://[{addr}]/x")).is_err(), "URL with {addr}");
        }
        assert_eq!(normalize(ip("::ffff:127.0.0.1")), ip("127.0.0.1"));
        assert_eq!(p.check_addr(None, ip("::ffff:10.1.2.3")), Ok(()));
        // The URL parser normalizes odd IPv4 spellings first: all of these are 127.0.0.1.
        for url in ["http://2130706433/", "http://0x7f.1/", "http://127.1/", "http://0177.0.0.1/"] {
            assert!(p.check_url(url).is_err(), "{url}");
        }
    }

    #[test]
    fn localhost_names_and_the_api_server_are_refused() {
        let p = strict().with_api_server("api.cluster.example").with_api_server("10.96.0.1");
        for url in [
            "http://localhost:8080/",
            "http://LOCALHOST./",
            "http://a.b.localhost/",
            "https://kubernetes.default/",
            "https://kubernetes.default.svc/",
            "https://kubernetes.default.svc.cluster.local:443/api",
            "https://api.cluster.example:6443/",
            "https://10.96.0.1/",
            "https://[::ffff:10.96.0.1]/",
        ] {
            assert!(p.check_url(url).is_err(), "{url}");
        }
        assert!(matches!(p.check_url("https://10.96.0.1/"), Err(Refusal::ApiServer(_))));
        assert_eq!(p.check_url("http://mylocalhost.example/"), Ok(()));
        assert_eq!(p.check_url("https://kubernetes-dashboard.svc/"), Ok(()));
        // A name resolving to the API server's address is refused when resolved.
        assert!(p.check_addr(Some("innocent.example"), ip("10.96.0.1")).is_err());
    }

    #[test]
    fn the_allow_list_overrides() {
        let p = allowing(&["127.0.0.1/32", "::1", "localhost", "*.internal.example", "169.254.10.0/24"]);
        assert_eq!(p.check_url("http://127.0.0.1:9000/"), Ok(()));
        assert_eq!(p.check_url("http://[::ffff:127.0.0.1]:9000/"), Ok(()));
        assert_eq!(p.check_url("http://[::1]:9000/"), Ok(()));
        assert_eq!(p.check_url("http://localhost:9000/"), Ok(()));
        assert_eq!(p.check_addr(Some("localhost"), ip("127.0.0.5")), Ok(()), "an allowed name vouches");
        assert_eq!(p.check_addr(Some("cb.internal.example"), ip("169.254.169.254")), Ok(()));
        assert_eq!(p.check_addr(None, ip("169.254.10.3")), Ok(()));
        // Only what is listed.
        assert!(p.check_url("http://127.0.0.2/").is_err());
        assert!(p.check_url("http://a.localhost/").is_err());
        assert!(p.check_addr(None, ip("169.254.169.254")).is_err());
        assert!(p.check_addr(Some("other.example"), ip("127.0.0.1")).is_ok(), "127.0.0.1 is listed");
        assert!(p.check_addr(Some("other.example"), ip("127.0.0.2")).is_err());
        assert!(p.check_url("http://internal.example/").is_ok(), "not a refused name");
    }

    #[test]
    fn allow_entries_parse() {
        assert_eq!("10.1.2.3/8".parse(), Ok(Allow::Net("10.0.0.0/8".parse().unwrap())));
        assert_eq!("127.0.0.1".parse(), Ok(Allow::Net("127.0.0.1/32".parse().unwrap())));
        assert_eq!("[::1]".parse(), Ok(Allow::Net("::1/128".parse().unwrap())));
        assert_eq!("Callbacks.Example.COM.".parse(), Ok(Allow::Host("callbacks.example.com".into())));
        assert_eq!("*.example.com".parse(), Ok(Allow::Domain(".example.com".into())));
        for bad in ["", "10.0.0.0/33", "http://x", "a b", "*.", "x/y"] {
            assert!(bad.parse::<Allow>().is_err(), "{bad:?}");
        }
        let a: Allow = "*.example.com".parse().unwrap();
        assert_eq!(a.to_string(), "*.example.com");
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let sa = |s: &str| SocketAddr::new(ip(s), 0);
        let p = strict().with_api_server("10.96.0.1");
        // DNS rebinding: an innocent name resolving to refused addresses only.
        for refused in
            [&["127.0.0.1", "::1"][..], &["169.254.169.254"], &["10.96.0.1"], &["::ffff:127.0.0.1"]]
        {
            let got = p.filter("cb.example", refused.iter().map(|a| sa(a)));
            assert!(got.is_err(), "{refused:?}");
        }
        // Mixed: only the allowed addresses are kept.
        assert_eq!(p.filter("cb.example", [sa("127.0.0.1"), sa("10.1.2.3")]).unwrap(), vec![sa("10.1.2.3")]);
        assert!(p.filter("localhost", [sa("10.1.2.3")]).is_err(), "a refused name");
        let p = allowing(&["cb.example"]);
        assert_eq!(p.filter("cb.example", [sa("127.0.0.1")]).unwrap(), vec![sa("127.0.0.1")]);
    }

    #[tokio::test]
    async fn the_resolver_refuses_and_says_so() {
        use reqwest::dns::Resolve;
        let r = Resolver(Arc::new(strict()));
        let e = r.resolve("localhost".parse().unwrap()).await.err().expect("refused");
        assert!(is_refused(&*e), "{e}");
        assert_eq!(e.to_string(), "refused by the callback egress policy");
        let r = Resolver(Arc::new(allowing(&["localhost"])));
        let addrs: Vec<SocketAddr> =
            r.resolve("localhost".parse().unwrap()).await.expect("allowed").collect();
        assert!(!addrs.is_empty());
    }
}
