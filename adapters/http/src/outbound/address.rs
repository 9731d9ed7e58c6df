//! Where webhooks may go: HTTPS (or plain HTTP to loopback, or anywhere if allowed), and
//! only to public addresses unless loopback or private ones are allowed. The check runs
//! on the URL when it is configured or given, and again on every address a name resolves
//! to when a delivery connects (the delivery worker's resolver), so a name that later resolves to
//! a private address (DNS rebinding) is refused then.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::Url;

/// What webhooks are allowed to reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Plain `http://` to any host (otherwise only to loopback hosts).
    pub allow_http: bool,
    /// Loopback addresses (`127.0.0.0/8`, `::1`, `localhost`).
    pub allow_loopback: bool,
    /// Private, shared, link-local and cloud metadata addresses (`10/8`, `172.16/12`,
    /// `192.168/16`, `100.64/10`, `169.254/16`, `fc00::/7`, `fe80::/10`, ...).
    pub allow_private: bool,
}

/// What kind of address an IP address is, for the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Reachable on the internet.
    Public,
    /// This machine.
    Loopback,
    /// A private, shared or link-local network, or a cloud metadata service.
    Private,
    /// Never a destination: unspecified, multicast, broadcast, documentation, reserved.
    Forbidden,
}

/// Why a URL or an address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    /// Not a URL.
    #[error("not a valid URL")]
    Invalid,
    /// Neither `https` nor `http`.
    #[error("the scheme must be https")]
    Scheme,
    /// Plain HTTP to a host that is not loopback, not allowed.
    #[error("plain http is allowed only to loopback hosts")]
    PlainHttp,
    /// User name or password in the URL.
    #[error("credentials in the URL are not allowed")]
    Credentials,
    /// The host is an address of a class not allowed.
    #[error("{0} is not an allowed destination ({1})")]
    Address(IpAddr, &'static str),
    /// The tenant restricts callback hosts, and this is not one of them.
    #[error("the host {0} is not among the tenant's callback hosts")]
    HostNotListed(String),
}

/// The class of `ip`.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let seg = v6.segments();
            if v6.is_loopback() {
                AddressClass::Loopback
            } else if v6.is_unspecified()
                || v6.is_multicast()
                || seg[0] == 0x2001 && (seg[1] == 0xdb8 || seg[1] == 0)
            {
                // Documentation, and Teredo (2001::/32, which embeds an IPv4 address).
                AddressClass::Forbidden
            } else if (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                || (seg[0] & 0xffc0) == 0xfec0
            {
                // Unique local (fc00::/7, also AWS's fd00:ec2::254), link-local and the old
                // site-local (fec0::/10).
                AddressClass::Private
            } else if seg[0] == 0x64 && seg[1] == 0xff9b || seg[0] == 0x2002 || seg[0] == 0 {
                // NAT64, 6to4 and the rest of ::/16 embed IPv4 addresses of any class.
                AddressClass::Forbidden
            } else {
                AddressClass::Public
            }
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_private() || ip.is_link_local() || (a == 100 && (64..128).contains(&b)) {
        // 10/8, 172.16/12, 192.168/16; 169.254/16 (with the metadata service at
        // 169.254.169.254); 100.64/10 shared address space.
        AddressClass::Private
    } else if ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || a >= 240
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || (a == 198 && (18..20).contains(&b))
    {
        AddressClass::Forbidden
    } else {
        AddressClass::Public
    }
}

impl AddressPolicy {
    /// Whether webhooks may connect to `ip`.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), UrlRefused> {
        match classify(ip) {
            AddressClass::Public => Ok(()),
            AddressClass::Loopback if self.allow_loopback => Ok(()),
            AddressClass::Private if self.allow_private => Ok(()),
            AddressClass::Loopback => Err(UrlRefused::Address(ip, "loopback")),
            AddressClass::Private => Err(UrlRefused::Address(ip, "private or link-local")),
            AddressClass::Forbidden => Err(UrlRefused::Address(ip, "reserved")),
        }
    }

    /// Checks what can be known of `url` without resolving it: scheme, credentials, and the
    /// address when the host is one (or `localhost`). Returns it parsed.
    pub fn check_url(&self, url: &str) -> Result<Url, UrlRefused> {
        let parsed = Url::parse(url).map_err(|_| UrlRefused::Invalid)?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(UrlRefused::Credentials);
        }
        let host = parsed.host().ok_or(UrlRefused::Invalid)?;
        let literal = match host {
            url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            url::Host::Domain(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                (name == "localhost" || name.ends_with(".localhost"))
                    .then_some(IpAddr::V6(Ipv6Addr::LOCALHOST))
            }
        };
        if let Some(ip) = literal {
            self.check_ip(ip)?;
        }
        match parsed.scheme() {
            "https" => Ok(parsed),
            "http" if self.allow_http => Ok(parsed),
            "http" if literal.is_some_and(|ip| classify(ip) == AddressClass::Loopback) => {
                Ok(parsed)
            }
            "http" => Err(UrlRefused::PlainHttp),
            _ => Err(UrlRefused::Scheme),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> AddressPolicy {
        AddressPolicy::default()
    }

    #[test]
    fn addresses_are_classified() {
        for (ip, class) in [
            ("8.8.8.8", AddressClass::Public),
            ("127.0.0.1", AddressClass::Loopback),
            ("::1", AddressClass::Loopback),
            ("10.0.0.1", AddressClass::Private),
            ("172.20.1.1", AddressClass::Private),
            ("192.168.1.1", AddressClass::Private),
            ("169.254.169.254", AddressClass::Private),
            ("100.100.100.200", AddressClass::Private),
            ("fd00:ec2::254", AddressClass::Private),
            ("fe80::1", AddressClass::Private),
            ("::ffff:169.254.169.254", AddressClass::Private),
            ("::ffff:127.0.0.1", AddressClass::Loopback),
            ("0.0.0.0", AddressClass::Forbidden),
            ("::", AddressClass::Forbidden),
            ("255.255.255.255", AddressClass::Forbidden),
            ("224.0.0.1", AddressClass::Forbidden),
            ("64:ff9b::a9fe:a9fe", AddressClass::Forbidden),
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                AddressClass::Forbidden,
            ),
            ("fec0::1", AddressClass::Private),
            ("2606:4700::1111", AddressClass::Public),
        ] {
            assert_eq!(classify(ip.parse().unwrap()), class, "{ip}");
        }
    }

    #[test]
    fn urls_are_checked_for_what_can_be_known_before_resolving() {
        let p = strict();
        assert!(p.check_url("https://hooks.example.com/x").is_ok());
        assert_eq!(
            p.check_url("http://hooks.example.com/x"),
            Err(UrlRefused::PlainHttp)
        );
        assert!(matches!(
            p.check_url("https://169.254.169.254/latest/meta-data"),
            Err(UrlRefused::Address(..))
        ));
        assert!(matches!(
            p.check_url("https://10.0.0.1/"),
            Err(UrlRefused::Address(..))
        ));
        assert!(matches!(
            p.check_url("http://[::1]:8080/"),
            Err(UrlRefused::Address(..))
        ));
        assert!(matches!(
            p.check_url("https://localhost/"),
            Err(UrlRefused::Address(..))
        ));
        assert!(matches!(
            p.check_url("https://0x7f.1/"),
            Err(UrlRefused::Address(..))
        ));
        assert_eq!(p.check_url("ftp://example.com/"), Err(UrlRefused::Scheme));
        assert_eq!(
            p.check_url("https://u:p@example.com/"),
            Err(UrlRefused::Credentials)
        );
        assert_eq!(p.check_url("not a url"), Err(UrlRefused::Invalid));

        let local = AddressPolicy {
            allow_loopback: true,
            ..strict()
        };
        assert!(local.check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(local.check_url("http://[::1]:9000/hook").is_ok());
        assert!(local.check_url("http://10.0.0.1/").is_err());
        let private = AddressPolicy {
            allow_private: true,
            allow_http: true,
            ..strict()
        };
        assert!(private.check_url("http://10.0.0.1/").is_ok());
    }
}
