//! The NATS permissions each identity needs, and nothing more. The same lists render
//! nats-server `authorization` blocks (tests, docs) and can be issued in user JWTs.
//!
//! A device may read its own desired state, write its own status and heartbeat, and answer
//! relay sessions addressed to it. Every JetStream API subject it may use names its own key:
//! reads are direct gets by subject, and its manifest watch is a consumer whose filter is in
//! the create subject (which the server checks against the request).

use crate::{
    DeviceId,
    kv::{ACTUAL_STATE, BUCKETS, DESIRED_STATE, HEARTBEAT},
    relay,
};

/// Subjects an identity may publish to and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// Whether it may publish replies to requests it received (any number, for an hour):
    /// relay sessions stream frames to the requester's inbox, and JetStream's flow-control
    /// requests on a watch need answers.
    pub allow_responses: bool,
}

/// A device's permissions. `inbox_prefix` is the agent's (`_INBOX_<device>` by default), so
/// no device can read another's replies.
pub fn device(device: &DeviceId, inbox_prefix: &str) -> Permissions {
    let api = "$JS.API";
    let mut publish: Vec<String> = BUCKETS
        .iter()
        .map(|b| format!("{api}.STREAM.INFO.{}", b.stream()))
        .collect();
    for b in [DESIRED_STATE, ACTUAL_STATE] {
        publish.push(format!(
            "{api}.DIRECT.GET.{}.{}",
            b.stream(),
            b.subject(device)
        ));
    }
    publish.push(format!(
        "{api}.CONSUMER.CREATE.{}.*.{}",
        DESIRED_STATE.stream(),
        DESIRED_STATE.subject(device)
    ));
    publish.push(ACTUAL_STATE.subject(device));
    publish.push(HEARTBEAT.subject(device));
    Permissions {
        publish,
        subscribe: vec![format!("{inbox_prefix}.>"), relay::device_wildcard(device)],
        allow_responses: true,
    }
}

/// The controller's: it creates the buckets, writes desired state, and reads status and
/// heartbeats (rollouts, offline devices).
pub fn controller() -> Permissions {
    Permissions {
        publish: vec![
            "$JS.API.>".into(),
            DESIRED_STATE.all_subjects(),
            // KV deletes of a removed device's keys.
            ACTUAL_STATE.all_subjects(),
            HEARTBEAT.all_subjects(),
        ],
        subscribe: vec!["_INBOX.>".into()],
        allow_responses: true,
    }
}

/// The bridge's: it reads status and heartbeats and opens relay sessions to devices.
pub fn bridge() -> Permissions {
    let mut publish: Vec<String> = [ACTUAL_STATE, HEARTBEAT]
        .iter()
        .flat_map(|b| {
            [
                format!("$JS.API.STREAM.INFO.{}", b.stream()),
                format!("$JS.API.CONSUMER.CREATE.{}", b.stream()),
                format!("$JS.API.CONSUMER.CREATE.{}.>", b.stream()),
                format!("$JS.API.DIRECT.GET.{}.>", b.stream()),
            ]
        })
        .collect();
    publish.push("fleetlet.relay.>".into());
    Permissions {
        publish,
        subscribe: vec!["_INBOX.>".into()],
        allow_responses: true,
    }
}

impl Permissions {
    /// A nats-server `authorization.users` entry for `user` with this password (plain or
    /// a bcrypt hash).
    pub fn server_user(&self, user: &str, password: &str) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let responses = if self.allow_responses {
            "\n      allow_responses: { max: -1, expires: \"1h\" }"
        } else {
            ""
        };
        format!(
            "  {{\n    user: \"{user}\"\n    password: \"{password}\"\n    permissions: {{\n      publish: {{ allow: [{}] }}\n      subscribe: {{ allow: [{}] }}{responses}\n    }}\n  }}\n",
            list(&self.publish),
            list(&self.subscribe),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_may_only_name_its_own_keys() {
        let d = DeviceId::new("pi-a").unwrap();
        let p = device(&d, "_INBOX_pi-a");
        for s in &p.publish {
            let own = s.ends_with(".pi-a") || s.starts_with("$JS.API.STREAM.INFO.");
            assert!(own, "{s}");
            assert!(!s.contains('>'), "{s}");
        }
        assert!(
            !p.publish
                .iter()
                .any(|s| s.contains(DESIRED_STATE.name) && s.starts_with("$KV."))
        );
        assert_eq!(p.subscribe, ["_INBOX_pi-a.>", "fleetlet.relay.pi-a.>"]);
    }

    #[test]
    fn the_bridge_cannot_touch_desired_state() {
        assert!(!bridge().publish.iter().any(|s| s.contains("desired-state")));
    }
}
