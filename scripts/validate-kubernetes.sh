#!/usr/bin/env bash
# Checks the Kubernetes manifests in deploy/kubernetes/ without a cluster:
#   - every manifest against the API schemas of the last three Kubernetes minor versions that
#     the installed kubernetes-validate knows, strictly (an unknown field fails), where a kind
#     or apiVersion it has no schema for fails too (kubernetes-validate only warns);
#   - the references between them: accounts, ConfigMap and Secret keys, selectors, ports,
#     the variables the configuration files name, each directory's Kustomization;
#   - itself: a broken manifest must be refused, so that this check cannot pass by checking
#     nothing.
# kubernetes-validate comes from scripts/setup.sh's venv (on PATH after
# `eval "$(scripts/setup.sh)"`). Writes nothing but a temporary directory it removes.
set -euo pipefail
cd "$(dirname "$0")/.."

# The directories to check: both setups unless named.
if [ "$#" -gt 0 ]; then dirs=("$@"); else dirs=(deploy/kubernetes/small deploy/kubernetes/production); fi

validator="$(command -v kubernetes-validate)" || {
  echo "kubernetes-validate is not on PATH; run: eval \"\$(scripts/setup.sh)\"" >&2
  exit 1
}
# The interpreter kubernetes-validate is installed for, which has its package and PyYAML.
read -r -a python <<<"$(sed -n '1s/^#! *//p' "$validator")"
if [ "${#python[@]}" -eq 0 ] || ! "${python[@]}" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  python=("$(dirname "$validator")/python3")
fi

# The last three minor versions the installed schemas cover, newest last.
mapfile -t versions < <("${python[@]}" - <<'EOF'
from packaging.version import Version
from kubernetes_validate.utils import all_versions, major_minor
minors = sorted({major_minor(v) for v in all_versions()}, key=Version)
print("\n".join(minors[-3:]))
EOF
)
if [ "${#versions[@]}" -lt 3 ]; then
  echo "kubernetes-validate knows fewer than three Kubernetes versions: ${versions[*]:-none}" >&2
  exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Validates FILES against every version; prints what is wrong and fails on anything but a pass.
validate() {
  local version output status failed=0
  for version in "${versions[@]}"; do
    status=0
    output="$("$validator" --strict --quiet -k "$version" "$@" 2>&1)" || status=$?
    # With --quiet a pass prints nothing; a missing schema is only a WARN, with status 0.
    if [ "$status" -ne 0 ] || [ -n "$output" ]; then
      printf '%s\n' "$output"
      failed=1
    fi
  done
  return "$failed"
}

# The self-check: an unknown field, and a kind of an apiVersion that does not exist.
cat >"$tmp/unknown-field.yaml" <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: broken
spec:
  selector:
    matchLabels: {app: broken}
  template:
    metadata:
      labels: {app: broken}
    spec:
      containers:
        - name: broken
          image: broken
          imagePullPolicyy: IfNotPresent
EOF
cat >"$tmp/unknown-kind.yaml" <<'EOF'
apiVersion: apps/v9
kind: Deployment
metadata:
  name: broken
spec: {}
EOF
for broken in "$tmp/unknown-field.yaml" "$tmp/unknown-kind.yaml"; do
  if validate "$broken" >/dev/null; then
    echo "the validator accepted $(basename "$broken"), a broken manifest: this check would prove nothing" >&2
    exit 1
  fi
done
echo "kubernetes-validate refuses an unknown field and an unknown apiVersion, as it must"

failed=0
for dir in "${dirs[@]}"; do
  files=("$dir"/*.yaml)
  if validate "${files[@]}"; then
    echo "$dir: ${#files[@]} files valid (--strict) against Kubernetes ${versions[*]}"
  else
    echo "$dir: invalid against the schemas above" >&2
    failed=1
  fi
done

# The references between the manifests, which no schema sees.
"${python[@]}" - "${dirs[@]}" <<'EOF' || failed=1
import os
import re
import sys

import yaml

NAMESPACE = "claudecluster"
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "StatefulSet"}
# Variables that name keys of a service's section, and the subcommand that runs the service.
CONFIG_VARIABLE = re.compile(r"^CLAUDECLUSTER_([A-Z0-9]+)__")
OWN_SECTIONS = {"telemetry", "cluster"}
# The dollar-and-braces references a configuration file may make (see libs/config).
FILE_VARIABLE = re.compile(r"\$\{([A-Za-z0-9_]+)(:-[^}]*)?\}")

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def matches(selector, labels):
    """Whether a label selector (matchLabels / matchExpressions) selects these labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def check_directory(directory):
    files = sorted(name for name in os.listdir(directory) if name.endswith(".yaml"))
    resources = []
    for name in files:
        with open(os.path.join(directory, name)) as handle:
            documents = [doc for doc in yaml.safe_load_all(handle) if doc]
        if not documents:
            problem(f"{directory}/{name}", "holds no resource")
        for doc in documents:
            resources.append((f"{directory}/{name}", doc))

    kustomization = os.path.join(directory, "Kustomization")
    if not os.path.exists(kustomization):
        problem(directory, "has no Kustomization")
    else:
        with open(kustomization) as handle:
            listed = yaml.safe_load(handle).get("resources") or []
        if sorted(listed) != files:
            problem(kustomization, f"lists {sorted(listed)}, but the directory holds {files}")

    by_kind = {}
    for where, doc in resources:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if (kind, name) in by_kind:
            problem(where, f"{kind} {name} is defined twice")
        by_kind[(kind, name)] = doc
        namespace = doc["metadata"].get("namespace")
        if kind in CLUSTER_SCOPED:
            if name != NAMESPACE:
                problem(where, f"{kind} {name}: expected the namespace {NAMESPACE}")
        elif namespace != NAMESPACE:
            problem(where, f"{kind} {name} is in namespace {namespace!r}, not {NAMESPACE}")

    def named(kind):
        return {name: doc for (k, name), doc in by_kind.items() if k == kind}

    config_maps, secrets = named("ConfigMap"), named("Secret")
    accounts, roles = named("ServiceAccount"), named("Role")
    secret_keys = {
        name: set((doc.get("stringData") or {}) | (doc.get("data") or {}))
        for name, doc in secrets.items()
    }

    pods = []  # (where, workload name, pod template)
    for where, doc in resources:
        if doc["kind"] not in WORKLOADS:
            continue
        name, spec = doc["metadata"]["name"], doc["spec"]
        template = spec["template"]
        labels = template["metadata"].get("labels") or {}
        here = f"{where}: {doc['kind']} {name}"
        pods.append((here, name, template))
        if not matches(spec["selector"], labels):
            problem(here, "its selector does not select its own pods")
        pod = template["spec"]
        if pod.get("serviceAccountName") not in accounts:
            problem(here, f"service account {pod.get('serviceAccountName')!r} is not defined")
        context = pod.get("securityContext") or {}
        if not context.get("runAsNonRoot") or context.get("runAsUser") != 10001:
            problem(here, "must run as the non-root user 10001")
        if (context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problem(here, "must use the RuntimeDefault seccomp profile")
        volumes = {volume["name"]: volume for volume in pod.get("volumes") or []}
        volumes.update(
            {claim["metadata"]["name"]: claim for claim in spec.get("volumeClaimTemplates") or []}
        )
        env_of_mounted_files = {}
        for container in pod["containers"]:
            cname = f"{here} container {container['name']}"
            security = container.get("securityContext") or {}
            if security.get("allowPrivilegeEscalation") is not False:
                problem(cname, "must set allowPrivilegeEscalation: false")
            if security.get("readOnlyRootFilesystem") is not True:
                problem(cname, "must have a read-only root filesystem")
            if (security.get("capabilities") or {}).get("drop") != ["ALL"]:
                problem(cname, "must drop all capabilities")
            resources_ = container.get("resources") or {}
            for bound in ("requests", "limits"):
                for quantity in ("cpu", "memory"):
                    if quantity not in (resources_.get(bound) or {}):
                        problem(cname, f"sets no {bound}.{quantity}")
            if "readinessProbe" not in container or "livenessProbe" not in container:
                problem(cname, "needs liveness and readiness probes")
            ports = {port.get("name") for port in container.get("ports") or []}
            container.setdefault("_ports", ports)
            env = {}
            for variable in container.get("env") or []:
                env[variable["name"]] = variable
                reference = (variable.get("valueFrom") or {}).get("secretKeyRef")
                if reference:
                    if reference["name"] not in secrets:
                        problem(cname, f"{variable['name']}: Secret {reference['name']} is not defined")
                    elif reference["key"] not in secret_keys[reference["name"]]:
                        problem(cname, f"{variable['name']}: Secret {reference['name']} has no key {reference['key']}")
            command = container.get("command") or []
            if command[:1] == ["claudecluster"] and len(command) > 1:
                service = command[1]
                for variable in env:
                    section = CONFIG_VARIABLE.match(variable)
                    if section and section.group(1).lower() not in OWN_SECTIONS | {service}:
                        problem(cname, f"{variable} sets a key of another section than {service}'s")
            for mount in container.get("volumeMounts") or []:
                volume = volumes.get(mount["name"])
                if volume is None:
                    problem(cname, f"mounts {mount['name']}, which is no volume of the pod")
                    continue
                source = volume.get("configMap")
                if source:
                    if source["name"] not in config_maps:
                        problem(cname, f"ConfigMap {source['name']} is not defined")
                        continue
                    data = config_maps[source["name"]].get("data") or {}
                    for item in source.get("items") or []:
                        if item["key"] not in data:
                            problem(cname, f"ConfigMap {source['name']} has no key {item['key']}")
                        else:
                            env_of_mounted_files[(source["name"], item["key"])] = (cname, env)
        # Each variable a mounted configuration file names must be set in the pod, or the
        # service stops at once.
        for (config_map, key), (cname, env) in env_of_mounted_files.items():
            text = config_maps[config_map]["data"][key]
            try:
                yaml.safe_load(text)
            except yaml.YAMLError as error:
                problem(cname, f"{config_map}/{key} is not YAML: {error}")
            for name, default in FILE_VARIABLE.findall(text):
                if not default and name not in env:
                    problem(cname, f"{config_map}/{key} names {name}, which the container does not set")

    for where, doc in resources:
        kind, name, spec = doc["kind"], doc["metadata"]["name"], doc.get("spec") or {}
        here = f"{where}: {kind} {name}"
        if kind == "Service":
            selected = [
                (pname, template) for _, pname, template in pods
                if matches({"matchLabels": spec["selector"]}, template["metadata"]["labels"])
            ]
            if not selected:
                problem(here, "selects no pod")
            for port in spec.get("ports") or []:
                target = port.get("targetPort")
                for pname, template in selected:
                    names = set().union(*(c["_ports"] for c in template["spec"]["containers"]))
                    if isinstance(target, str) and target not in names:
                        problem(here, f"targets port {target}, which {pname} does not name")
        elif kind == "StatefulSet":
            service = spec.get("serviceName")
            if service and ("Service", service) not in by_kind:
                problem(here, f"serviceName {service} is not defined")
        elif kind in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = spec.get("selector") if kind == "PodDisruptionBudget" else spec.get("podSelector")
            # The agent policy is for the pods of an execution mode to come.
            future = (selector.get("matchLabels") or {}).get("app.kubernetes.io/component") == "agent"
            if selector and not future and not any(
                matches(selector, template["metadata"]["labels"]) for _, _, template in pods
            ):
                problem(here, "selects no pod")
        elif kind == "RoleBinding":
            if doc["roleRef"]["name"] not in roles:
                problem(here, f"Role {doc['roleRef']['name']} is not defined")
            for subject in doc["subjects"]:
                if subject["kind"] == "ServiceAccount" and subject["name"] not in accounts:
                    problem(here, f"ServiceAccount {subject['name']} is not defined")
    if ("Namespace", NAMESPACE) not in by_kind:
        problem(directory, f"does not define the namespace {NAMESPACE}")
    return len(resources)


counts = {directory: check_directory(directory) for directory in sys.argv[1:]}
for message in problems:
    print(message, file=sys.stderr)
if problems:
    sys.exit(1)
for directory, count in counts.items():
    print(f"{directory}: {count} resources, references consistent")
EOF

exit "$failed"
