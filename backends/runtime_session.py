"""One way to open a session on any runtime fxq runs: a provider name in, an object with ``run(images) ->
{name: tensor}`` out — :class:`fxq.backends.OrtSession` for onnxruntime's providers ("cpu", "cuda", "tensorrt",
or a full provider name), :class:`fxq.backends.openvino_session.OpenVinoSession` for "openvino"."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch

from fxq.backends.openvino_session import OpenVinoSession
from fxq.backends.session import OrtSession

#: Provider names that select OpenVINO (its CPU device) instead of an onnxruntime execution provider.
OPENVINO_PROVIDERS = ("openvino", "openvino:cpu")

Session = OrtSession | OpenVinoSession


def is_openvino(provider: str) -> bool:
    """Whether ``provider`` names OpenVINO rather than an onnxruntime execution provider."""
    return isinstance(provider, str) and provider.lower() in OPENVINO_PROVIDERS


def open_session(path: str | os.PathLike, provider: str = "cpu", *, threads: int | None = None) -> Session:
    """A session on ``provider`` for the ONNX model at ``path`` (InputError naming what to install when the
    runtime or provider is missing)."""
    if is_openvino(provider):
        return OpenVinoSession(path, "cpu", threads=threads)
    return OrtSession(path, provider, threads=threads)


def feed_call(session: Session, images: torch.Tensor) -> Callable[[], object]:
    """A no-argument call running one inference of ``session`` on ``images`` (prepared once; for timing loops)."""
    feed = np.ascontiguousarray(images.detach().cpu().float().numpy())
    if isinstance(session, OpenVinoSession):
        return lambda: session.run_feed(feed)
    return lambda: session.session.run(None, {session.input_names[0]: feed})
