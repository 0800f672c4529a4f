//! The agent's NetworkConfig reconciler against a real systemd-networkd (in the systemd
//! sandbox's own network namespace, `scripts/systemd-sandbox --network`), driven through
//! real NATS by an agent that runs in that namespace and reaches NATS only through the
//! interface it configures:
//!
//! agent ──tcp 10.77.0.2:4222── socat (in the namespace) ──unix socket── this test ──tcp──
//! nats-server (127.0.0.1)
//!
//! So a configuration that takes 10.77.0.2 away cuts the agent off from its control plane,
//! as a wrong address on a device's only uplink would.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

mod common;

use std::path::{Path, PathBuf};

use common::*;
use fleetlet_protocol::{
    ManagedResource, NetworkConfigSpec, ResourceDetails, ResourceSpec, ResourceStatus, RouteSpec,
};
use fleetlet_testenv::{
    DEFAULT_TIMEOUT, TestEnv,
    process::Service,
    sandbox::{NetworkSandbox, SystemdSandbox},
    wait::until,
};

const UPLINK: &str = "fl0";
const PORT: u16 = 4222;

fn net(id: &str, spec: NetworkConfigSpec) -> ManagedResource {
    let mut r = file_at(id, "/unused", "");
    r.spec = ResourceSpec::NetworkConfig(spec);
    r
}

fn uplink(addresses: &[&str]) -> NetworkConfigSpec {
    NetworkConfigSpec {
        interface: UPLINK.into(),
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        routes: vec![RouteSpec {
            destination: "10.124.0.0/24".into(),
            gateway: Some("10.78.0.1".into()),
            metric: None,
        }],
        mtu: Some(1400),
        confirm_seconds: Some(8),
        ..Default::default()
    }
}

/// Relays connections on a unix socket to NATS on the host's loopback.
fn relay_to_nats(socket: PathBuf, nats: String) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        while let Ok((mut unix, _)) = listener.accept().await {
            let nats = nats.clone();
            tokio::spawn(async move {
                if let Ok(mut tcp) = tokio::net::TcpStream::connect(&nats).await {
                    let _ = tokio::io::copy_bidirectional(&mut unix, &mut tcp).await;
                }
            });
        }
    })
}

fn spawn_in(
    sbx: &NetworkSandbox,
    name: &str,
    program: &Path,
    args: &[String],
    log: PathBuf,
) -> Service {
    let (nsenter, all) = sbx.command(program, args);
    Service::spawn_with_env(name, &nsenter, &all, &[], log).unwrap()
}

/// The IPv4 ones of `addresses` (networkd also gives the link an IPv6 link-local one),
/// sorted.
fn v4(addresses: &[String]) -> Vec<String> {
    let mut out: Vec<String> = addresses
        .iter()
        .filter(|a| !a.contains(':'))
        .cloned()
        .collect();
    out.sort();
    out
}

fn details(s: &fleetlet_protocol::AgentStatus, id: &str) -> Vec<String> {
    match s.resources[id].details() {
        Some(ResourceDetails::NetworkConfig { addresses, .. }) => v4(addresses),
        _ => panic!("{id}: {:?}", s.resources[id]),
    }
}

async fn wait_addresses(sbx: &NetworkSandbox, what: &str, pred: impl Fn(&[String]) -> bool) {
    let _ = until(
        what,
        DEFAULT_TIMEOUT,
        || async { sbx.addresses(UPLINK).map(|a| v4(&a)) },
        |a| a.as_ref().is_ok_and(|a| pred(a)),
    )
    .await;
}

#[tokio::test]
async fn interfaces_are_configured_repaired_rolled_back_and_released_through_networkd() {
    let env = TestEnv::builder().nats().start().await.unwrap();
    let sbx = SystemdSandbox::start_with_network().await.unwrap();
    let (desired, actual, _) = buckets(&env).await;

    // The device's own uplink: an interface its owner configured (networkd, a file of
    // theirs), the only way to the control plane.
    sbx.ip(&["link", "add", UPLINK, "type", "ifb"]).unwrap();
    let owner_file = sbx.network_dir.join("50-owner.network");
    std::fs::write(
        &owner_file,
        format!(
            "[Match]\nName={UPLINK}\n[Network]\nAddress=10.77.0.2/24\nIPv6AcceptRA=no\nLinkLocalAddressing=no\n"
        ),
    )
    .unwrap();
    sbx.reload().unwrap();
    wait_addresses(&sbx, "the owner's address", |a| a == ["10.77.0.2/24"]).await;

    let dev = Device::new("pi-net");
    let socket = dev.dir.path().join("nats.sock");
    let _relay = relay_to_nats(
        socket.clone(),
        env.nats_url()
            .unwrap()
            .trim_start_matches("nats://")
            .to_owned(),
    );
    let _socat = spawn_in(
        &sbx,
        "socat",
        Path::new("/usr/bin/socat"),
        &[
            format!("TCP-LISTEN:{PORT},reuseaddr,fork"),
            format!("UNIX-CONNECT:{}", socket.display()),
        ],
        dev.dir.path().join("socat.log"),
    );
    let mut dev = dev;
    dev.sections = format!(
        "[systemd]\nbus_address = \"{}\"\n[network]\ndir = \"{}\"\n",
        sbx.systemd.bus_address,
        sbx.network_dir.display()
    );
    let config = dev.write_config(
        &format!("nats://10.77.0.2:{PORT}"),
        "enabled_kinds = [\"file\", \"networkConfig\"]",
        "",
    );
    std::fs::create_dir_all(dev.root()).unwrap();
    let mut agent = spawn_in(
        &sbx,
        "fleetlet-agent",
        Path::new(env!("CARGO_BIN_EXE_fleetlet-agent")),
        &["--config".into(), config.display().to_string()],
        dev.dir.path().join("agent.log"),
    );

    // Applied: a second address and a route through it, beside the owner's address, and
    // an MTU. (VLANs are not tried here: this machine's kernel has no 802.1Q support.)
    let ours = sbx
        .network_dir
        .join(format!("10-fleetlet-{UPLINK}.network"));
    put(
        &desired,
        &dev.manifest(
            1,
            vec![net("uplink", uplink(&["10.77.0.2/24", "10.78.0.5/24"]))],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "uplink configured", |s| {
        all_ready(s, 1, 1)
    })
    .await;
    assert_eq!(details(&s, "uplink"), ["10.77.0.2/24", "10.78.0.5/24"]);
    assert_eq!(
        v4(&sbx.addresses(UPLINK).unwrap()),
        ["10.77.0.2/24", "10.78.0.5/24"]
    );
    assert!(sbx.routes().unwrap().contains(&"10.124.0.0/24".to_owned()));
    let link: serde_json::Value =
        serde_json::from_str(&sbx.ip(&["-j", "link", "show", UPLINK]).unwrap()).unwrap();
    assert_eq!(link[0]["mtu"], 1400, "{link}");
    assert!(read(&ours).starts_with("# Managed by fleetlet (device pi-net, resource uplink)"));
    let applied = read(&ours);

    // Drift: an address removed by hand comes back.
    sbx.ip(&["addr", "del", "10.78.0.5/24", "dev", UPLINK])
        .unwrap();
    assert!(
        !sbx.addresses(UPLINK)
            .unwrap()
            .contains(&"10.78.0.5/24".to_owned())
    );
    wait_addresses(&sbx, "the removed address is back", |a| {
        a.contains(&"10.78.0.5/24".to_owned())
    })
    .await;
    wait_status(&actual, &dev.id, "drift counted", |s| {
        s.drift_repairs > 0
            && s.last_drift
                .as_ref()
                .is_some_and(|d| d.resource.as_str() == "uplink")
    })
    .await;

    // Bad input is reported per resource; the uplink stays as it is.
    let mut bad_cidr = uplink(&["10.0.0.300/24"]);
    bad_cidr.interface = "fl1".into();
    let mut absent = uplink(&["10.79.0.2/24"]);
    absent.interface = "nosuch0".into();
    let mut lo = uplink(&[]);
    lo.interface = "lo".into();
    put(
        &desired,
        &dev.manifest(
            2,
            vec![
                net("uplink", uplink(&["10.77.0.2/24", "10.78.0.5/24"])),
                net("bad-cidr", bad_cidr),
                net("absent", absent),
                net("lo", lo),
            ],
        ),
    )
    .await;
    let s = wait_status(&actual, &dev.id, "bad input reported", |s| {
        s.observed_generation == 2
            && ["bad-cidr", "absent", "lo"]
                .iter()
                .all(|id| matches!(s.resources.get(*id), Some(ResourceStatus::Failed { .. })))
    })
    .await;
    let error = |id: &str| match &s.resources[id] {
        ResourceStatus::Failed { error, .. } => error.clone(),
        other => panic!("{id}: {other:?}"),
    };
    assert!(
        error("bad-cidr").contains("\"10.0.0.300\" is not an IP address"),
        "{}",
        error("bad-cidr")
    );
    assert!(
        error("absent").contains("nosuch0 does not exist"),
        "{}",
        error("absent")
    );
    assert!(error("lo").contains("loopback"), "{}", error("lo"));
    assert!(s.resources["uplink"].is_ready());
    assert!(!sbx.network_dir.join("10-fleetlet-fl1.network").exists());
    assert!(!sbx.network_dir.join("10-fleetlet-lo.network").exists());

    // A change that takes the uplink's address away: the agent loses NATS, restores the
    // previous file after the confirm time, and reports the rollback once it is back.
    put(
        &desired,
        &dev.manifest(3, vec![net("uplink", uplink(&["10.88.0.2/24"]))]),
    )
    .await;
    wait_addresses(&sbx, "the breaking change applied", |a| {
        a == ["10.88.0.2/24"]
    })
    .await;
    let s = wait_status(&actual, &dev.id, "rolled back", |s| {
        s.observed_generation == 3
            && matches!(&s.resources.get("uplink"), Some(ResourceStatus::Failed { error, permanent: true, .. }) if error.starts_with("rolled back:"))
    })
    .await;
    assert_eq!(
        v4(&sbx.addresses(UPLINK).unwrap()),
        ["10.77.0.2/24", "10.78.0.5/24"],
        "{s:#?}"
    );
    assert_eq!(read(&ours), applied, "the previous file is back");
    // Not applied again: the drift passes leave the rolled-back spec alone.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(
        !sbx.addresses(UPLINK)
            .unwrap()
            .contains(&"10.88.0.2/24".to_owned())
    );

    // A power cut inside the confirm window: the agent dies with a breaking change
    // applied; started again (and still cut off), it finds the unconfirmed change and
    // rolls it back.
    put(
        &desired,
        &dev.manifest(4, vec![net("uplink", uplink(&["10.89.0.2/24"]))]),
    )
    .await;
    wait_addresses(&sbx, "the second breaking change applied", |a| {
        a == ["10.89.0.2/24"]
    })
    .await;
    agent.kill_program().unwrap();
    drop(agent);
    let _agent = spawn_in(
        &sbx,
        "fleetlet-agent",
        Path::new(env!("CARGO_BIN_EXE_fleetlet-agent")),
        &["--config".into(), config.display().to_string()],
        dev.dir.path().join("agent-2.log"),
    );
    wait_status(&actual, &dev.id, "rolled back after a restart", |s| {
        s.observed_generation == 4
            && matches!(&s.resources.get("uplink"), Some(ResourceStatus::Failed { error, .. }) if error.starts_with("rolled back:"))
    })
    .await;
    assert_eq!(
        v4(&sbx.addresses(UPLINK).unwrap()),
        ["10.77.0.2/24", "10.78.0.5/24"]
    );
    assert_eq!(read(&ours), applied, "the last confirmed file is back");

    // Dropped from the manifest: fleetlet's file goes, networkd takes back what it set,
    // and the owner's configuration applies again.
    put(&desired, &dev.manifest(5, vec![])).await;
    wait_status(&actual, &dev.id, "uplink released", |s| {
        s.observed_generation == 5 && s.resources.is_empty()
    })
    .await;
    assert!(!ours.exists());
    wait_addresses(&sbx, "the owner's address alone", |a| a == ["10.77.0.2/24"]).await;
    assert!(owner_file.exists(), "the owner's file is never touched");
}
