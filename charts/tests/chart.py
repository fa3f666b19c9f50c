#!/usr/bin/env python3
"""Checks the Helm chart and the plain manifests without a cluster or a helm binary.

- `helm lint --strict` through Helm's Go SDK (PyPI helm-python-sdk) reports no error;
- the chart renders with default values and with a watched namespace plus ServiceMonitor;
- every rendered object of a built-in kind validates against Kubernetes' OpenAPI schema
  (PyPI kubernetes-validate);
- RBAC grants every call `operator rbac` lists, and nothing cluster-wide when a namespace is set;
- the operator Deployment is locked down and probed;
- the chart's CRD and deploy/operator.yaml are current (`--write` regenerates the latter).
"""
import json
import pathlib
import subprocess
import sys

import helm_python
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ferromq-operator"
OPERATOR = ROOT / "target" / "debug" / "operator"
K8S_VERSION = "1.33.0"
failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)


def render(values, namespace="ferromq-system"):
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values, name="ferromq", namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            check("kubectl apply" in text, "NOTES.txt should say what to apply next")
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def rules_of(docs, kinds):
    rules = []
    for d in docs:
        if d["kind"] in kinds:
            rules.extend(d.get("rules", []))
    return rules


def grants(rules, group, resource, verb):
    return any(group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
               for r in rules)


def all_in_one():
    """Namespace + CRD + the chart rendered with default values: deploy/operator.yaml."""
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ferromq-system"}}
    crd = yaml.safe_load((ROOT / "crds" / "brokercluster.yaml").read_text())
    docs = [ns, crd] + render({})
    header = "# ferromq operator, all in one: kubectl apply -f deploy/operator.yaml\n" \
             "# Generated from charts/ferromq-operator by charts/tests/chart.py --write; do not edit.\n"
    return header + "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


def main():
    if "--write" in sys.argv:
        (ROOT / "deploy" / "operator.yaml").write_text(all_in_one())
        print("wrote deploy/operator.yaml")
        return 0

    lint = helm_python.lint(str(CHART), strict=True)
    check(not lint["errors"], f"helm lint errors: {lint['errors']}")
    for m in lint["messages"]:
        check(m["severity"] < 3, f"helm lint: {m}")

    needed = json.loads(subprocess.check_output([str(OPERATOR), "rbac"]))
    for values, ns_scoped in [({}, False), ({"watchNamespace": "apps", "metrics": {"serviceMonitor": {"enabled": True}}}, True)]:
        docs = render(values)
        kinds = [d["kind"] for d in docs]
        for kind in ["ServiceAccount", "Deployment", "Service"]:
            check(kind in kinds, f"{values}: no {kind} rendered")
        for d in docs:
            if d["apiVersion"].startswith("monitoring.coreos.com"):
                continue
            try:
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            except Exception as e:  # noqa: BLE001 - report every failure, not the first
                check(False, f"{d['kind']}/{d['metadata']['name']} does not validate: {e}")
        check(("ClusterRole" in kinds) != ns_scoped, f"{values}: ClusterRole present={not ns_scoped} expected")
        main_rules = rules_of(docs, {"ClusterRole"} if not ns_scoped else {"Role"})
        for r in needed["rules"]:
            for verb in r["verbs"]:
                check(grants(main_rules, r["apiGroup"], r["resource"], verb),
                      f"{values}: RBAC does not grant {verb} {r['apiGroup']}/{r['resource']}")
        lease_rules = rules_of([d for d in docs if d["metadata"]["name"].endswith("leader-election")], {"Role"})
        for r in needed["leaderElection"]:
            for verb in r["verbs"]:
                check(grants(lease_rules, r["apiGroup"], r["resource"], verb), f"leader election lacks {verb} {r['resource']}")
        granted = {(g, res, v) for r in rules_of(docs, {"ClusterRole", "Role"})
                   for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]}
        wanted = {(r["apiGroup"], r["resource"], v) for r in needed["rules"] + needed["leaderElection"] for v in r["verbs"]}
        check(granted <= wanted, f"{values}: RBAC grants more than the operator uses: {sorted(granted - wanted)}")
        dep = next(d for d in docs if d["kind"] == "Deployment")
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        check(pod["securityContext"]["runAsNonRoot"] is True, "operator pod must run as non-root")
        check(pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", "seccomp RuntimeDefault")
        check(c["securityContext"]["readOnlyRootFilesystem"] is True, "read-only root filesystem")
        check(c["securityContext"]["capabilities"]["drop"] == ["ALL"], "drop all capabilities")
        check(c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz",
              "probes on /healthz and /readyz")
        if ns_scoped:
            check("--namespace=apps" in c["args"], "watchNamespace must reach the operator's args")
            check("ServiceMonitor" in kinds, "serviceMonitor.enabled must render a ServiceMonitor")

    chart_crd = (CHART / "crds" / "brokercluster.yaml").read_text()
    check(chart_crd == (ROOT / "crds" / "brokercluster.yaml").read_text(),
          "charts/ferromq-operator/crds/brokercluster.yaml differs from crds/brokercluster.yaml: copy it")
    check((ROOT / "deploy" / "operator.yaml").read_text() == all_in_one(),
          "deploy/operator.yaml is stale: run charts/tests/chart.py --write")

    for f in failures:
        print("FAIL:", f)
    print(f"chart checks: {'FAILED' if failures else 'ok'} ({len(failures)} failure(s))")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
