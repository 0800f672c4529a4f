//! Kubernetes label selector matching, for selecting devices by their labels.

use std::collections::BTreeMap;

use fleetlet_crds::LabelSelector;

/// Whether `labels` satisfy `selector` (an empty selector matches everything, as in
/// Kubernetes). Unknown operators match nothing, so a typo never selects the whole fleet.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlet_crds::k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let l = labels(&[("role", "sensor"), ("site", "home")]);
        let sel = |ml: &[(&str, &str)], ex: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: Some(labels(ml)),
            match_expressions: Some(ex),
        };
        assert!(matches(&LabelSelector::default(), &l));
        assert!(matches(&sel(&[("role", "sensor")], vec![]), &l));
        assert!(!matches(&sel(&[("role", "gateway")], vec![]), &l));
        assert!(matches(
            &sel(&[], vec![expr("site", "In", &["home", "office"])]),
            &l
        ));
        assert!(!matches(
            &sel(&[], vec![expr("site", "NotIn", &["home"])]),
            &l
        ));
        assert!(matches(&sel(&[], vec![expr("zone", "NotIn", &["a"])]), &l));
        assert!(matches(&sel(&[], vec![expr("role", "Exists", &[])]), &l));
        assert!(!matches(
            &sel(&[], vec![expr("role", "DoesNotExist", &[])]),
            &l
        ));
        assert!(!matches(
            &sel(&[("role", "sensor")], vec![expr("site", "In", &["office"])]),
            &l
        ));
        assert!(!matches(
            &sel(&[], vec![expr("role", "Typo", &["sensor"])]),
            &l
        ));
    }
}
