//! NetworkConfig: one interface's settings, applied on the device through systemd-networkd.

use std::{collections::BTreeSet, net::IpAddr};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::manifest::{SpecError, invalid};

/// Most addresses, routes, DNS servers, search domains or VLANs one interface may list.
pub const MAX_NETWORK_ITEMS: usize = 64;

/// Shortest and longest wait for the control plane after a change (`confirmSeconds`).
pub const CONFIRM_SECONDS: std::ops::RangeInclusive<u32> = 5..=3600;

/// The settings of one network interface, applied through systemd-networkd. A change after
/// which the device no longer reaches its control plane is rolled back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfigSpec {
    /// Interface name, e.g. `eth0` (1 to 15 letters, digits, `-`, `_` or `.`).
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    )]
    pub interface: String,
    /// Get addresses by DHCP (IPv4 and IPv6).
    #[serde(default)]
    pub dhcp: bool,
    /// Static addresses with prefix length, e.g. `192.168.1.20/24` or `fd00::20/64`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Further routes through this interface.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSpec>,
    /// DNS servers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// DNS search domains (`~example.net` for a routing-only domain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// Link MTU in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 68, max = 65535))]
    pub mtu: Option<u32>,
    /// VLANs carried on this interface; each is an interface of its own, configured by a
    /// NetworkConfig naming it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlans: Vec<VlanSpec>,
    /// How long the device may go without reaching its control plane after applying a
    /// change before it restores the previous settings (default: the device's setting,
    /// 60 s unless its owner changed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 3600))]
    pub confirm_seconds: Option<u32>,
}

/// A route through the interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// Destination network with prefix length, e.g. `10.20.0.0/16`.
    pub destination: String,
    /// Next hop; absent for a network reached directly on the link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Route priority: lower wins among routes to the same destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u32>,
}

/// An 802.1Q VLAN on the interface.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VlanSpec {
    /// The VLAN interface's name, e.g. `eth0.10`.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    )]
    pub name: String,
    /// The VLAN id, 1 to 4094.
    #[schemars(range(min = 1, max = 4094))]
    pub id: u16,
}

/// An address with its prefix length, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} has no prefix length (e.g. 192.168.1.20/24)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{prefix:?} is not a prefix length (0 to {max})"))?;
        Ok(Self { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Whether `name` can be a Linux interface name networkd matches exactly (no globs).
pub fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn check_interface(field: &str, name: &str) -> Result<(), SpecError> {
    if is_interface_name(name) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} is not an interface name (1 to 15 letters, digits, '-', '_' or '.')"),
        ))
    }
}

fn check_ip(field: String, s: &str) -> Result<IpAddr, SpecError> {
    s.parse()
        .map_err(|_| invalid(field, format!("{s:?} is not an IP address")))
}

fn check_count<T>(field: &str, items: &[T]) -> Result<(), SpecError> {
    if items.len() > MAX_NETWORK_ITEMS {
        return Err(invalid(
            field,
            format!("{} entries; the limit is {MAX_NETWORK_ITEMS}", items.len()),
        ));
    }
    Ok(())
}

fn is_domain(d: &str) -> bool {
    let d = d.strip_prefix('~').unwrap_or(d);
    let d = d.strip_suffix('.').unwrap_or(d);
    (1..=253).contains(&d.len())
        && d.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl NetworkConfigSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        check_interface("networkConfig.interface", &self.interface)?;
        if self.interface == "lo" {
            return Err(invalid(
                "networkConfig.interface",
                "the loopback interface is not configurable",
            ));
        }
        check_count("networkConfig.addresses", &self.addresses)?;
        for (i, a) in self.addresses.iter().enumerate() {
            a.parse::<Cidr>()
                .map_err(|e| invalid(format!("networkConfig.addresses[{i}]"), e))?;
        }
        if let Some(g) = &self.gateway {
            check_ip("networkConfig.gateway".into(), g)?;
        }
        check_count("networkConfig.routes", &self.routes)?;
        for (i, r) in self.routes.iter().enumerate() {
            r.destination
                .parse::<Cidr>()
                .map_err(|e| invalid(format!("networkConfig.routes[{i}].destination"), e))?;
            if let Some(g) = &r.gateway {
                check_ip(format!("networkConfig.routes[{i}].gateway"), g)?;
            }
        }
        check_count("networkConfig.dns", &self.dns)?;
        for (i, d) in self.dns.iter().enumerate() {
            check_ip(format!("networkConfig.dns[{i}]"), d)?;
        }
        check_count("networkConfig.domains", &self.domains)?;
        for (i, d) in self.domains.iter().enumerate() {
            if !is_domain(d) {
                return Err(invalid(
                    format!("networkConfig.domains[{i}]"),
                    format!("{d:?} is not a domain name"),
                ));
            }
        }
        if let Some(mtu) = self.mtu
            && !(68..=65535).contains(&mtu)
        {
            return Err(invalid(
                "networkConfig.mtu",
                format!("{mtu} is outside 68 to 65535"),
            ));
        }
        self.validate_vlans()?;
        if let Some(s) = self.confirm_seconds
            && !CONFIRM_SECONDS.contains(&s)
        {
            return Err(invalid(
                "networkConfig.confirmSeconds",
                format!(
                    "{s} is outside {} to {}",
                    CONFIRM_SECONDS.start(),
                    CONFIRM_SECONDS.end()
                ),
            ));
        }
        Ok(())
    }

    fn validate_vlans(&self) -> Result<(), SpecError> {
        check_count("networkConfig.vlans", &self.vlans)?;
        let (mut names, mut ids) = (BTreeSet::new(), BTreeSet::new());
        for (i, v) in self.vlans.iter().enumerate() {
            let field = format!("networkConfig.vlans[{i}]");
            check_interface(&format!("{field}.name"), &v.name)?;
            if !(1..=4094).contains(&v.id) {
                return Err(invalid(
                    format!("{field}.id"),
                    format!("{} is outside 1 to 4094", v.id),
                ));
            }
            if v.name == self.interface || !names.insert(v.name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("{:?} is named twice", v.name),
                ));
            }
            if !ids.insert(v.id) {
                return Err(invalid(
                    format!("{field}.id"),
                    format!("VLAN {} is listed twice", v.id),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> NetworkConfigSpec {
        NetworkConfigSpec {
            interface: "eth0".into(),
            addresses: vec!["192.168.1.20/24".into(), "fd00::20/64".into()],
            gateway: Some("192.168.1.1".into()),
            routes: vec![RouteSpec {
                destination: "10.20.0.0/16".into(),
                gateway: Some("192.168.1.254".into()),
                metric: Some(100),
            }],
            dns: vec!["192.168.1.1".into()],
            domains: vec!["home.arpa".into(), "~corp.example".into()],
            mtu: Some(1500),
            vlans: vec![VlanSpec {
                name: "eth0.10".into(),
                id: 10,
            }],
            ..Default::default()
        }
    }

    fn refused(s: NetworkConfigSpec, field: &str) {
        let e = s.validate().expect_err("refused");
        let SpecError::Invalid { field: f, .. } = &e;
        assert_eq!(f, field, "{e}");
    }

    #[test]
    fn a_full_spec_passes() {
        spec().validate().unwrap();
    }

    #[test]
    fn bad_input_names_its_field() {
        let with = |f: fn(&mut NetworkConfigSpec)| {
            let mut s = spec();
            f(&mut s);
            s
        };
        refused(
            with(|s| s.interface = "lo".into()),
            "networkConfig.interface",
        );
        refused(
            with(|s| s.interface = "eth*".into()),
            "networkConfig.interface",
        );
        refused(
            with(|s| s.interface = "../x".into()),
            "networkConfig.interface",
        );
        refused(
            with(|s| s.interface = "a23456789012345x".into()),
            "networkConfig.interface",
        );
        refused(
            with(|s| s.interface = "eth0\nName=*".into()),
            "networkConfig.interface",
        );
        refused(
            with(|s| s.addresses[1] = "10.0.0.300/24".into()),
            "networkConfig.addresses[1]",
        );
        refused(
            with(|s| s.addresses[0] = "10.0.0.1/33".into()),
            "networkConfig.addresses[0]",
        );
        refused(
            with(|s| s.addresses[0] = "10.0.0.1".into()),
            "networkConfig.addresses[0]",
        );
        refused(
            with(|s| s.gateway = Some("gw".into())),
            "networkConfig.gateway",
        );
        refused(
            with(|s| s.routes[0].destination = "10.0.0.0/x".into()),
            "networkConfig.routes[0].destination",
        );
        refused(
            with(|s| s.dns.push("1.1.1.1\n[Match]".into())),
            "networkConfig.dns[1]",
        );
        refused(
            with(|s| s.domains.push("a b".into())),
            "networkConfig.domains[2]",
        );
        refused(with(|s| s.mtu = Some(20)), "networkConfig.mtu");
        refused(with(|s| s.vlans[0].id = 4095), "networkConfig.vlans[0].id");
        refused(
            with(|s| s.vlans[0].name = "eth0".into()),
            "networkConfig.vlans[0].name",
        );
        refused(
            with(|s| s.confirm_seconds = Some(1)),
            "networkConfig.confirmSeconds",
        );
        refused(
            with(|s| s.addresses = vec!["10.0.0.1/8".into(); MAX_NETWORK_ITEMS + 1]),
            "networkConfig.addresses",
        );
    }

    #[test]
    fn cidrs_print_as_they_parse() {
        for s in ["10.0.0.1/8", "fd00::1/64", "0.0.0.0/0"] {
            assert_eq!(s.parse::<Cidr>().unwrap().to_string(), s);
        }
    }
}
