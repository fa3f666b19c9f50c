//! A small stateful stand-in for the Kubernetes API server, plugged into `kube::Client` as a
//! tower service: namespaced GET, LIST (label selectors), server-side apply and merge PATCH
//! (status subresource included), DELETE and POST. Every write is recorded so tests can assert
//! exactly what a reconcile changed. Like the real API server, a write that changes `spec` bumps
//! `metadata.generation`, and an update that changes a StatefulSet's volumeClaimTemplates,
//! selector, serviceName or podManagementPolicy is refused (422).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

type Key = (String, String, String); // plural, namespace, name

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    writes: Vec<String>,
    /// Every call as (api group, resource[/subresource], RBAC verb).
    calls: Vec<(String, String, String)>,
    /// Writes ("METHOD plural/name[/status]") answered with an error code until cleared.
    failing: Vec<(String, u16)>,
    version: u64,
}

/// The fake API server.
#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<State>>);

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn status(code: u16, reason: &str, message: String) -> Response<Full<Bytes>> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": if code < 300 { "Success" } else { "Failure" },
        "reason": reason, "message": message, "code": code});
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(code).unwrap();
    r
}

fn ok(v: &Value) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from(v.to_string())))
}

/// StatefulSet spec fields the API server refuses to change on an existing object.
const STATEFULSET_IMMUTABLE: &[&str] = &[
    "volumeClaimTemplates",
    "selector",
    "serviceName",
    "podManagementPolicy",
];

/// The API server's 422 for an update of a StatefulSet that changes a field it refuses to.
fn refused_update(
    plural: &str,
    name: &str,
    old: &Value,
    new: &Value,
) -> Option<Response<Full<Bytes>>> {
    if plural != "statefulsets" {
        return None;
    }
    let changed: Vec<&str> = STATEFULSET_IMMUTABLE
        .iter()
        .copied()
        .filter(|f| old["spec"][f] != new["spec"][f])
        .collect();
    (!changed.is_empty()).then(|| {
        status(
            422,
            "Invalid",
            format!(
                "StatefulSet.apps \"{name}\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden (changed: {})",
                changed.join(", ")
            ),
        )
    })
}

fn matches(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        obj["metadata"]["labels"][k].as_str() == Some(v)
    })
}

impl FakeApi {
    /// A `kube::Client` talking to this fake.
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req).await) }
        });
        kube::Client::new(svc, "default")
    }

    /// Stores an object as if created by a user.
    pub fn insert(&self, plural: &str, ns: &str, mut obj: Value) {
        let mut st = self.0.lock().unwrap();
        st.version += 1;
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        obj["metadata"]["namespace"] = json!(ns);
        obj["metadata"]["uid"] = json!(format!("uid-{name}"));
        obj["metadata"]["resourceVersion"] = json!(st.version.to_string());
        if obj["metadata"]["generation"].is_null() {
            obj["metadata"]["generation"] = json!(1);
        }
        st.objects.insert((plural.into(), ns.into(), name), obj);
    }

    /// An object, if stored.
    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.0
            .lock()
            .unwrap()
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Names of stored objects of a kind.
    pub fn names(&self, plural: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .objects
            .keys()
            .filter(|k| k.0 == plural)
            .map(|k| k.2.clone())
            .collect()
    }

    /// Writes since the last call, as "METHOD plural/name[/status]".
    pub fn take_writes(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap().writes)
    }

    /// Makes a write ("METHOD plural/name[/status]", as recorded) fail with a 500 until
    /// [`FakeApi::heal`].
    pub fn fail(&self, write: &str) {
        self.0
            .lock()
            .unwrap()
            .failing
            .push((write.to_string(), 500));
    }

    /// Makes a write refused as invalid (422, what the API server answers an object its
    /// validation refuses) until [`FakeApi::heal`].
    pub fn refuse(&self, write: &str) {
        self.0
            .lock()
            .unwrap()
            .failing
            .push((write.to_string(), 422));
    }

    /// Ends every failure set by [`FakeApi::fail`].
    pub fn heal(&self) {
        self.0.lock().unwrap().failing.clear();
    }

    /// Every call so far as (api group, resource, RBAC verb).
    pub fn calls(&self) -> Vec<(String, String, String)> {
        self.0.lock().unwrap().calls.clone()
    }

    /// Changes a stored object (e.g. a StatefulSet's status, a spec edit).
    pub fn edit(&self, plural: &str, ns: &str, name: &str, patch: Value) {
        let mut st = self.0.lock().unwrap();
        let obj = st
            .objects
            .get_mut(&(plural.into(), ns.into(), name.into()))
            .unwrap();
        let spec_changed = patch.get("spec").is_some();
        merge(obj, &patch);
        if spec_changed {
            let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(g + 1);
        }
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let uri = req.uri().clone();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let parts: Vec<&str> = uri.path().split('/').filter(|p| !p.is_empty()).collect();
        let Some(i) = parts.iter().position(|p| *p == "namespaces") else {
            return status(404, "NotFound", format!("unsupported path {}", uri.path()));
        };
        let ns = parts.get(i + 1).copied().unwrap_or_default().to_string();
        let plural = parts.get(i + 2).copied().unwrap_or_default().to_string();
        let name = parts.get(i + 3).map(|s| s.to_string());
        let sub = parts.get(i + 4).copied();
        let query: BTreeMap<String, String> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.replace("%3D", "=")
                        .replace("%2C", ",")
                        .replace("%2F", "/"),
                )
            })
            .collect();
        let mut st = self.0.lock().unwrap();
        let group = if parts.first() == Some(&"api") {
            String::new()
        } else {
            parts.get(1).copied().unwrap_or_default().to_string()
        };
        let verb = match (&method, &name) {
            (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true") => "watch",
            (&Method::GET, None) => "list",
            (&Method::GET, Some(_)) => "get",
            (&Method::PATCH, _) => "patch",
            (&Method::PUT, _) => "update",
            (&Method::POST, _) => "create",
            (&Method::DELETE, _) => "delete",
            _ => "unknown",
        };
        let resource = match sub {
            Some(s) => format!("{plural}/{s}"),
            None => plural.clone(),
        };
        // A server-side apply of an object that does not exist yet creates it, and the API
        // server authorizes that as `create` as well as `patch`.
        let applies_new = method == Method::PATCH
            && sub.is_none()
            && query.contains_key("fieldManager")
            && name.as_ref().is_some_and(|n| {
                !st.objects
                    .contains_key(&(plural.clone(), ns.clone(), n.clone()))
            });
        if applies_new {
            st.calls
                .push((group.clone(), resource.clone(), "create".to_string()));
        }
        st.calls.push((group, resource, verb.to_string()));
        if method != Method::GET {
            let target = format!(
                "{plural}/{}{}",
                name.clone().unwrap_or_default(),
                sub.map(|s| format!("/{s}")).unwrap_or_default()
            );
            let write = format!("{method} {target}");
            st.writes.push(write.clone());
            if let Some((_, code)) = st.failing.iter().find(|(w, _)| *w == write) {
                let reason = if *code == 422 {
                    "Invalid"
                } else {
                    "InternalError"
                };
                return status(*code, reason, format!("{write}: injected failure"));
            }
        }
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        };
        match (method, name) {
            (Method::GET, None) => {
                let selector = query.get("labelSelector").cloned().unwrap_or_default();
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, v)| k.0 == plural && k.1 == ns && matches(v, &selector))
                    .map(|(_, v)| v.clone())
                    .collect();
                ok(
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": st.version.to_string()}, "items": items}),
                )
            }
            (Method::GET, Some(name)) => {
                match st.objects.get(&(plural.clone(), ns.clone(), name.clone())) {
                    Some(v) => ok(v),
                    None => status(404, "NotFound", format!("{plural} {name} not found")),
                }
            }
            (Method::PATCH, Some(name)) => {
                st.version += 1;
                let version = st.version;
                let key = (plural.clone(), ns.clone(), name.clone());
                let existing = st.objects.get(&key).cloned();
                let obj = match (sub, existing) {
                    (Some("status"), Some(mut cur)) => {
                        cur["status"] = body["status"].clone();
                        cur
                    }
                    (Some(_), _) => {
                        return status(
                            404,
                            "NotFound",
                            format!("{plural} {name}: unsupported subresource"),
                        )
                    }
                    (None, Some(mut cur)) if !query.contains_key("fieldManager") => {
                        let before = cur["spec"].clone();
                        merge(&mut cur, &body);
                        if cur["spec"] != before {
                            let g = cur["metadata"]["generation"].as_i64().unwrap_or(1);
                            cur["metadata"]["generation"] = json!(g + 1);
                        }
                        cur
                    }
                    (None, existing) => {
                        let mut new = body.clone();
                        if let Some(cur) = existing {
                            new["status"] = cur["status"].clone();
                            new["metadata"]["uid"] = cur["metadata"]["uid"].clone();
                            let g = cur["metadata"]["generation"].as_i64().unwrap_or(1);
                            let changed = cur["spec"] != new["spec"];
                            new["metadata"]["generation"] = json!(if changed { g + 1 } else { g });
                        } else {
                            new["metadata"]["uid"] = json!(format!("uid-{name}"));
                            new["metadata"]["generation"] = json!(1);
                        }
                        new
                    }
                };
                if let Some(cur) = st.objects.get(&key) {
                    if let Some(refused) = refused_update(&plural, &name, cur, &obj) {
                        return refused;
                    }
                }
                let mut obj = obj;
                obj["metadata"]["namespace"] = json!(ns);
                if let Some(cur) = st.objects.get(&key) {
                    // As the API server: a write that changes nothing keeps the version.
                    obj["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
                    if *cur == obj {
                        return ok(cur);
                    }
                }
                obj["metadata"]["resourceVersion"] = json!(version.to_string());
                st.objects.insert(key, obj.clone());
                ok(&obj)
            }
            (Method::PUT, Some(name)) => {
                let key = (plural.clone(), ns.clone(), name.clone());
                let current = st
                    .objects
                    .get(&key)
                    .map(|o| o["metadata"]["resourceVersion"].clone());
                if current.is_some() && current != Some(body["metadata"]["resourceVersion"].clone())
                {
                    return status(409, "Conflict", format!("{plural} {name} was modified"));
                }
                if let Some(cur) = st.objects.get(&key) {
                    if let Some(refused) = refused_update(&plural, &name, cur, &body) {
                        return refused;
                    }
                }
                st.version += 1;
                let mut obj = body.clone();
                obj["metadata"]["resourceVersion"] = json!(st.version.to_string());
                st.objects.insert(key, obj.clone());
                ok(&obj)
            }
            (Method::DELETE, Some(name)) => {
                match st.objects.remove(&(plural.clone(), ns, name.clone())) {
                    Some(v) => ok(&v),
                    None => status(404, "NotFound", format!("{plural} {name} not found")),
                }
            }
            (Method::POST, None) => {
                st.version += 1;
                let mut obj = body.clone();
                let name = obj["metadata"]["name"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| format!("obj-{}", st.version));
                obj["metadata"]["name"] = json!(name);
                st.objects.insert((plural, ns, name), obj.clone());
                ok(&obj)
            }
            (m, n) => status(
                405,
                "MethodNotAllowed",
                format!("{m} {plural} {n:?} is not supported by the fake"),
            ),
        }
    }
}
