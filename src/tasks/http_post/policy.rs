//! Where postbacks may go: an optional host allow-list, and never to
//! link-local or cloud metadata addresses unless allowed. Host names are
//! checked after resolution ([`GuardedResolver`]), so a DNS record cannot
//! steer a postback to the metadata service either.

use std::net::{IpAddr, SocketAddr};

use reqwest::Url;

use crate::config::HttpPostConfig;

/// Where postbacks may go.
#[derive(Debug, Clone, Default)]
pub struct HostPolicy {
    allow_hosts: Option<Vec<String>>,
    allow_link_local: bool,
}

impl HostPolicy {
    pub fn from_config(config: &HttpPostConfig) -> Self {
        Self {
            allow_hosts: config
                .allow_hosts
                .as_ref()
                .map(|hosts| hosts.iter().map(|h| h.to_ascii_lowercase()).collect()),
            allow_link_local: config.allow_link_local,
        }
    }

    /// Checks a URL's scheme and host (and its address, when it is an IP).
    pub fn check_url(&self, url: &Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme `{}` is not http or https", url.scheme()));
        }
        let host = url.host_str().ok_or("URL has no host")?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Some(allowed) = &self.allow_hosts
            && !allowed.iter().any(|h| h.eq_ignore_ascii_case(bare))
        {
            return Err(format!("host `{bare}` is not in http_post.allow_hosts"));
        }
        match bare.parse::<IpAddr>() {
            Ok(ip) => self.check_ip(ip),
            Err(_) => Ok(()),
        }
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => {
                (v6.segments()[0] & 0xffc0) == 0xfe80
                    // The EC2 metadata service's IPv6 address.
                    || v6 == "fd00:ec2::254".parse::<std::net::Ipv6Addr>().expect("valid literal")
                    || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
            }
        };
        if link_local && !self.allow_link_local {
            return Err(format!(
                "address {ip} is link-local or a metadata service (set http_post.allow_link_local to allow)"
            ));
        }
        Ok(())
    }
}

/// Resolves host names and drops addresses the policy forbids.
pub(super) struct GuardedResolver(pub(super) HostPolicy);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| policy.check_ip(a.ip()).is_ok())
                .collect();
            if addrs.is_empty() {
                return Err(format!("`{}` resolves to no allowed address", name.as_str()).into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: Option<&[&str]>) -> HostPolicy {
        HostPolicy::from_config(&HttpPostConfig {
            allow_hosts: hosts.map(|h| h.iter().map(|s| s.to_string()).collect()),
            ..HttpPostConfig::default()
        })
    }

    fn check(p: &HostPolicy, url: &str) -> Result<(), String> {
        p.check_url(&Url::parse(url).unwrap())
    }

    #[test]
    fn metadata_and_link_local_are_refused() {
        let p = policy(None);
        assert!(check(&p, "http://169.254.169.254/latest/meta-data/").is_err());
        assert!(check(&p, "http://[fe80::1]/").is_err());
        assert!(check(&p, "http://[fd00:ec2::254]/").is_err());
        assert!(check(&p, "http://127.0.0.1:9000/done").is_ok());
    }

    #[test]
    fn allow_list_is_enforced() {
        let p = policy(Some(&["api.example.com"]));
        assert!(check(&p, "https://API.example.com/x").is_ok());
        assert!(check(&p, "https://evil.example.com/x").is_err());
    }

    #[test]
    fn only_http_schemes() {
        assert!(check(&policy(None), "file:///etc/passwd").is_err());
        assert!(check(&policy(None), "ftp://host/x").is_err());
    }
}
