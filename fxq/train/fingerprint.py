"""Run fingerprint: the model architecture and the settings that decide a run's trajectory.

A checkpoint resumes only under an equal fingerprint; :func:`fingerprint_diff` names what differs.
"""

from __future__ import annotations

import hashlib
import json

from torch import nn

_SHOWN = 5


def model_signature(model: nn.Module) -> dict:
    """Class name and every state_dict entry's shape and dtype."""
    entries = {k: [list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()}
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "state_dict": entries}


def run_fingerprint(model: nn.Module, settings: dict) -> dict:
    """Fingerprint of a run: ``{"model": signature, "settings": settings, "digest": sha256}``."""
    body = {"model": model_signature(model), "settings": settings}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return {**body, "digest": digest}


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they are equal)."""
    if saved.get("digest") == current["digest"]:
        return []
    diffs = _model_diff(saved.get("model", {}), current["model"])
    old, new = saved.get("settings", {}), current["settings"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: checkpoint {old.get(key)!r}, now {new.get(key)!r}")
    return diffs or ["fingerprint digest differs"]


def _model_diff(old: dict, new: dict) -> list[str]:
    diffs = []
    if old.get("class") != new["class"]:
        diffs.append(f"model class: checkpoint {old.get('class')}, now {new['class']}")
    a, b = old.get("state_dict", {}), new["state_dict"]
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    changed = [k for k in a if k in b and a[k] != b[k]]
    if missing:
        diffs.append(f"model lacks {len(missing)} checkpoint weights, e.g. {missing[:_SHOWN]}")
    if extra:
        diffs.append(f"model has {len(extra)} weights not in the checkpoint, e.g. {extra[:_SHOWN]}")
    for k in changed[:_SHOWN]:
        diffs.append(f"{k}: checkpoint {a[k]}, now {b[k]}")
    if len(changed) > _SHOWN:
        diffs.append(f"... and {len(changed) - _SHOWN} more weights of another shape or dtype")
    return diffs
