"""`dvc repro` of the small profile in a fresh git+DVC repo, with the object store on a moto S3 server.

Checks the reproducibility contract (docs/reproducibility.md): a second repro is a no-op; a change
of ``train.log_every`` reruns nothing; a change of ``train.lr`` reruns exactly train → evaluate →
sweep; ``dvc push``/``dvc pull`` round-trip the manifests through an S3 remote; and after
``git checkout`` of the first commit + ``dvc pull`` the manifests name object-store keys that
still hold the bytes they held then (content-addressed keys: the rerun wrote elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = "profiles/small"
PIPELINE = f"{SMALL}/dvc.yaml"
STAGES = ["prepare", "score", "bin", "embed", "train", "evaluate", "sweep"]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, ok: bool = True) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MIROFLOW_DEBUG="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    if ok:
        assert proc.returncode == 0, f"{cmd} failed:\n{out[-6000:]}"
    return out


def _ran(out: str) -> list[str]:
    """Stage names ``dvc repro`` ran, sorted (evaluate and sweep are independent: either may go first)."""
    return sorted(re.findall(r"Running stage '[^']*:([a-z]+)'", out))


def _project(tmp: Path, bucket: str) -> Path:
    """A git+DVC repo holding this checkout's pipelines and code, the small profile made smaller
    still and its store on ``s3://<bucket>/store``."""
    work = tmp / "proj"
    work.mkdir()
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for rel in ("dvc.yaml", "params.yaml", "study.yaml", PIPELINE, f"{SMALL}/params.yaml", "study/dvc.yaml"):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, work / rel)
    p = yaml.safe_load((work / SMALL / "params.yaml").read_text())
    p["data"].update(num_samples=48, shard_size=24)
    p["train"].update(steps=6, batch_size=8, warmup_steps=2, log_every=3, eval_every=6, checkpoint_every=6)
    p["eval"].update(num_prompts=2, images_per_prompt=1, steps=3)
    p["sweep"].update(guidance_scales=[0.0], target_values=[1.0], best_of_n=[1])
    p["storage"]["root"] = f"s3://{bucket}/store"
    _write(work, p)
    (work / ".gitignore").write_text("src/**/__pycache__/\n")
    _run(["git", "init", "-q"], work)
    _run(["git", "config", "user.email", "t@example.invalid"], work)
    _run(["git", "config", "user.name", "test"], work)
    _run([str(BIN / "dvc"), "init", "-q"], work)
    return work


def _write(work: Path, params: dict[str, Any]) -> None:
    (work / SMALL / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _manifests(work: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((work / SMALL / "manifests").glob("*.json"))}


def _store_uris(doc: Any, prefix: str) -> set[str]:
    """Every string in a manifest that names something under the object store ``prefix``."""
    if isinstance(doc, str):
        return {doc} if doc.startswith(prefix) else set()
    if isinstance(doc, dict):
        return set().union(*(_store_uris(v, prefix) for v in doc.values())) if doc else set()
    if isinstance(doc, list):
        return set().union(*(_store_uris(v, prefix) for v in doc)) if doc else set()
    return set()


def _object_hashes(manifests: dict[str, bytes], bucket: str, endpoint: str) -> dict[str, str]:
    """sha256 of every object at or under a store URI the manifests name: ``{key: hex}``."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    prefix = f"s3://{bucket}/"
    uris: set[str] = set()
    for text in manifests.values():
        uris |= _store_uris(json.loads(text), prefix)
    assert uris, "the manifests name no object-store URI"
    out: dict[str, str] = {}
    for uri in sorted(uris):
        key = uri[len(prefix) :]
        found = s3.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
        assert found, f"{uri} (named by a manifest) holds no object"
        for obj in found:
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"]] = hashlib.sha256(body).hexdigest()
    return out


def test_small_profile_repro_is_incremental_and_content_addressed(
    tmp_path: Path, s3_bucket: str, moto_server: str
) -> None:
    work = _project(tmp_path, s3_bucket)
    dvc = str(BIN / "dvc")

    assert _ran(_run([dvc, "repro", PIPELINE], work)) == sorted(STAGES)
    assert _ran(_run([dvc, "repro", PIPELINE], work)) == []  # second run: a no-op

    params = yaml.safe_load((work / SMALL / "params.yaml").read_text())
    params["train"]["log_every"] = 2  # execution-only key: nothing reruns
    _write(work, params)
    out = _run([dvc, "repro", PIPELINE], work)
    assert _ran(out) == [], out[-3000:]

    _run([dvc, "remote", "add", "-d", "store", f"s3://{s3_bucket}/dvc-remote"], work)  # an S3 remote on moto
    _run([dvc, "remote", "modify", "store", "endpointurl", moto_server], work)
    _run(["git", "add", "-A"], work)
    _run(["git", "commit", "-qm", "first"], work)
    _run([dvc, "push", PIPELINE], work)
    first = _run(["git", "rev-parse", "HEAD"], work).strip()
    old_manifests = _manifests(work)
    old_objects = _object_hashes(old_manifests, s3_bucket, moto_server)
    old_ckpt = json.loads(old_manifests["train-small-miro.json"])["checkpoint"]

    params["train"]["lr"] = 0.0005  # one training key: train -> evaluate -> sweep, nothing upstream
    _write(work, params)
    assert _ran(_run([dvc, "repro", PIPELINE], work)) == ["evaluate", "sweep", "train"]
    new_ckpt = json.loads((work / SMALL / "manifests" / "train-small-miro.json").read_text())["checkpoint"]
    assert new_ckpt != old_ckpt  # the new weights went to another, content-addressed folder
    _run(["git", "add", "-A"], work)
    _run(["git", "commit", "-qm", "lr"], work)

    # push, lose the cache and the manifests, pull them back
    _run([dvc, "push", PIPELINE], work)
    pushed = _manifests(work)
    shutil.rmtree(work / ".dvc" / "cache")
    shutil.rmtree(work / SMALL / "manifests")
    _run([dvc, "pull", PIPELINE], work)
    assert _manifests(work) == pushed

    # the old commit: its manifests come back (from the remote: the cache never held them since)
    # and every object they name still holds its bytes
    _run(["git", "checkout", "-q", first], work)
    _run([dvc, "pull", PIPELINE], work)  # = fetch from the remote + dvc checkout
    assert _manifests(work) == old_manifests
    assert _object_hashes(old_manifests, s3_bucket, moto_server) == old_objects
    assert _ran(_run([dvc, "repro", PIPELINE], work)) == []  # and the old state is complete
