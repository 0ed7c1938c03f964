"""What the installed onnxruntime offers: execution providers by short name.

(Later: which QDQ patterns each provider fuses into integer kernels, for runtime-aware Q/DQ placement.)
"""

from __future__ import annotations

import onnxruntime as ort

from fxq.errors import InputError

#: Short provider names and the onnxruntime execution providers they select.
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers: known short names first, then full names."""
    installed = ort.get_available_providers()
    known = [name for name, provider in PROVIDERS.items() if provider in installed]
    return known + [p for p in installed if p not in PROVIDERS.values()]


def resolve_provider(name: str) -> str:
    """The onnxruntime provider for ``name`` ("cpu", "cuda", "tensorrt" or a full provider name).

    InputError naming the available providers when it is not installed.
    """
    provider = PROVIDERS.get(name.lower(), name) if isinstance(name, str) else name
    if provider not in ort.get_available_providers():
        raise InputError(
            f"execution provider {name!r} ({provider}) is not available in this onnxruntime "
            f"({ort.__version__}); available: {', '.join(available_providers())}. Install the matching "
            f"onnxruntime build (e.g. onnxruntime-gpu for cuda/tensorrt) or use provider='cpu'"
        )
    return provider
