"""Which vLLM is installed and how to import it (vllm_engine.py's docstring has the facts per version): VLLM_USE_V1
settled before the first import, RequestOutputKind looked up where each version keeps it."""

from __future__ import annotations

import logging
import os
import re
from importlib import metadata
from typing import Any

from processor.engines.base import EngineStartupError
from processor.settings import Settings

log = logging.getLogger(__name__)

# V0 was removed in vLLM 0.11.0: from there on V1 is the only engine and VLLM_USE_V1 means nothing.
V1_ONLY_SINCE = (0, 11)


def installed_vllm_version() -> tuple[int, ...] | None:
    """vLLM's version from its installed metadata, read without importing it (VLLM_USE_V1 must be settled
    first); None where it is not installed as a distribution (a test double on sys.path)."""
    try:
        text = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None
    parts: list[int] = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = re.match(r"\d+", piece)  # "0rc1" → 0
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts) or None


def configure_engine_selection(settings: Settings, version: tuple[int, ...] | None) -> None:
    """Set VLLM_USE_V1 where it selects an engine; drop it where V1 is the only one."""
    if version is not None and version >= V1_ONLY_SINCE:
        explicit = "VLLM_USE_V1" in os.environ or "vllm_use_v1" in settings.model_fields_set
        os.environ.pop("VLLM_USE_V1", None)  # unknown to these versions: vLLM would warn about it at start-up
        if explicit and settings.vllm_use_v1 == 0:
            log.warning(
                "VLLM_USE_V1=0 is ignored: vLLM %s has only the V1 engine (V0 was removed in 0.11)",
                ".".join(map(str, version)),
            )
        return
    # Must precede the first import of vllm anywhere in the process.
    os.environ["VLLM_USE_V1"] = str(settings.vllm_use_v1)


def import_vllm(settings: Settings) -> Any:
    configure_engine_selection(settings, installed_vllm_version())
    try:
        import vllm
    except ImportError as exc:
        raise EngineStartupError(
            "ENGINE=vllm needs vllm==0.6.3 (the GPU image's requirements.txt) or the current vLLM "
            f"(requirements-vllm-current.txt): {exc}"
        ) from None
    return vllm


def output_kind(vllm_module: Any, name: str = "FINAL_ONLY") -> Any | None:
    """RequestOutputKind.FINAL_ONLY (vllm.sampling_params in 0.6.3 and V1): step() then reports a request once,
    when it finishes, instead of building a cumulative output for every running request at every step. DELTA:
    every step reports each running request's new tokens and text (what the loop check reads)."""
    try:
        from vllm.sampling_params import RequestOutputKind
    except ImportError:
        return getattr(getattr(vllm_module, "RequestOutputKind", None), name, None)
    return getattr(RequestOutputKind, name, None)


def final_only_kind(vllm_module: Any) -> Any | None:
    return output_kind(vllm_module, "FINAL_ONLY")
