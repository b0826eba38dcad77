#!/usr/bin/env python3
"""CI: offline checks of deploy/ that have no linter of their own: the KEDA
objects' required fields (kubernetes-validate knows no CRDs) and the
Dockerfile's shape (when Docker cannot build it here)."""

import pathlib
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent.parent
errors = []


def need(ok, what):
    if not ok:
        errors.append(what)


objects = list(yaml.safe_load_all((root / "deploy/kubernetes/keda-scaledobject.yaml").read_text()))
deployments = [o for o in yaml.safe_load_all((root / "deploy/kubernetes/worker.yaml").read_text())
               if o and o.get("kind") == "Deployment"]
scaled = [o for o in objects if o and o.get("kind") == "ScaledObject"]
auths = {o["metadata"]["name"] for o in objects if o and o.get("kind") == "TriggerAuthentication"}
need(len(scaled) == 1, "one ScaledObject")
for obj in scaled:
    need(obj.get("apiVersion") == "keda.sh/v1alpha1", "ScaledObject apiVersion keda.sh/v1alpha1")
    target = obj["spec"]["scaleTargetRef"]["name"]
    need(target in {d["metadata"]["name"] for d in deployments}, f"scaleTargetRef {target} is the Deployment")
    for trigger in obj["spec"]["triggers"]:
        need(trigger.get("type") == "aws-sqs-queue", "an aws-sqs-queue trigger")
        meta = trigger.get("metadata", {})
        for field in ("queueURL", "queueLength", "awsRegion"):
            need(field in meta, f"trigger metadata.{field}")
        need(meta.get("scaleOnInFlight") == "true", "the backlog counts in-flight messages")
        ref = trigger.get("authenticationRef", {}).get("name")
        need(ref in auths, f"authenticationRef {ref} names a TriggerAuthentication")
for deployment in deployments:
    grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    need(grace > 300, "terminationGracePeriodSeconds above the 300 s drain")

dockerfile = (root / "deploy/docker/Dockerfile").read_text().splitlines()
froms = [l for l in dockerfile if l.startswith("FROM ")]
need(len(froms) >= 2, "a multi-stage Dockerfile")
users = [l for l in dockerfile if l.startswith("USER ")]
need(users and users[-1].split()[1] not in ("root", "0"), "the image runs as a non-root user")
need(any("strip" in l for l in dockerfile), "a stripped binary")
# Jobs run as their own user ([worker] run_as), which the image makes and
# which the binary's file capabilities let the non-root worker switch to.
need(any("useradd" in l and "renderq-job" in l for l in dockerfile), "the image makes the job user renderq-job")
need(any(l.startswith("RUN setcap") and "cap_setuid" in l for l in dockerfile), "the binary may switch to the job user")
configmaps = [o for o in yaml.safe_load_all((root / "deploy/kubernetes/worker.yaml").read_text())
              if o and o.get("kind") == "ConfigMap"]
need(all('run_as = "renderq-job"' in c["data"]["workers.toml"] for c in configmaps), "the pods run jobs as renderq-job")

if errors:
    sys.exit("deploy/ checks failed:\n  " + "\n  ".join(errors))
print("deploy/: KEDA objects and Dockerfile check out")
