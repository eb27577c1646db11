"""Engines behind one protocol: `extractive` (no model), `transformers` (CPU or CUDA), `vllm` (GPU, vLLM 0.6.3)."""

from __future__ import annotations

from processor.engines.base import Engine, EngineStartupError
from processor.settings import EngineKind, Settings


def create_engine(settings: Settings) -> Engine:
    """Build the engine ENGINE names; heavy imports (torch, vllm) happen only for the engine chosen."""
    if settings.engine is EngineKind.EXTRACTIVE:
        from processor.engines.extractive import ExtractiveEngine

        return ExtractiveEngine()
    if settings.engine is EngineKind.TRANSFORMERS:
        from processor.engines.transformers_engine import TransformersEngine

        return TransformersEngine.from_settings(settings)
    if settings.engine is EngineKind.VLLM:
        from processor.engines.vllm_engine import VllmEngine

        return VllmEngine.from_settings(settings)
    raise EngineStartupError(f"ENGINE={settings.engine!r} is not one of extractive, transformers, vllm")
