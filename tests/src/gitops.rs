//! fleetlet's Argo CD health checks (`examples/gitops/argocd-cm.yaml`), run the way Argo CD
//! runs them: Lua 5.1, the object as the global `obj`, a table `{status, message}` back.

use mlua::{LuaSerdeExt, SerializeOptions, Table};

use crate::{Error, repo_root};

/// Argo CD's verdict on a fleetlet object: `(status, message)`, e.g. `("Healthy", "...")`.
pub fn argocd_health(object: &serde_json::Value) -> Result<(String, String), Error> {
    let kind = object["kind"]
        .as_str()
        .ok_or_else(|| Error::Setup("the object has no kind".into()))?;
    let path = repo_root().join("examples/gitops/argocd-cm.yaml");
    let cm: serde_json::Value = serde_norway::from_str(&std::fs::read_to_string(&path)?)
        .map_err(|e| Error::Setup(format!("{}: {e}", path.display())))?;
    let key = format!("resource.customizations.health.fleetlet.dev_{kind}");
    let script = cm["data"][&key]
        .as_str()
        .ok_or_else(|| Error::Setup(format!("{} has no {key}", path.display())))?;
    let lua = mlua::Lua::new();
    let lua_err = |e: mlua::Error| Error::Setup(format!("{key}: {e}"));
    // JSON null is Lua nil, as in Argo CD.
    let opts = SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    let obj = lua.to_value_with(object, opts).map_err(lua_err)?;
    lua.globals().set("obj", obj).map_err(lua_err)?;
    let verdict: Table = lua.load(script).eval().map_err(lua_err)?;
    let status: String = verdict.get("status").map_err(lua_err)?;
    let message: Option<String> = verdict.get("message").map_err(lua_err)?;
    Ok((status, message.unwrap_or_default()))
}

/// What Flux's `wait: true` and `healthChecks` see: kstatus's verdict on an object of a
/// custom kind, computed as kstatus does (sigs.k8s.io/cli-utils `pkg/kstatus/status`, the
/// generic rules; Flux uses the same): `Terminating` while being deleted, `InProgress`
/// while `status.observedGeneration` is behind `metadata.generation` or `Reconciling` is
/// True, `Failed` when `Stalled` is True, otherwise `Current`. Ready is not read.
pub fn kstatus(object: &serde_json::Value) -> &'static str {
    if !object["metadata"]["deletionTimestamp"].is_null() {
        return "Terminating";
    }
    if let (Some(generation), Some(observed)) = (
        object["metadata"]["generation"].as_i64(),
        object["status"]["observedGeneration"].as_i64(),
    ) && generation != observed
    {
        return "InProgress";
    }
    let is_true = |type_: &str| {
        object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == type_ && c["status"] == "True")
    };
    if is_true("Reconciling") {
        "InProgress"
    } else if is_true("Stalled") {
        "Failed"
    } else {
        "Current"
    }
}
