"""Engines behind one protocol: `extractive` (no model), `transformers` (CPU or CUDA), `vllm` (GPU, vLLM 0.6.3),
`openai` (any OpenAI-compatible server)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from processor.engines.base import Engine, EngineStartupError
from processor.settings import EngineKind, Settings

if TYPE_CHECKING:
    from processor.metrics import Metrics


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
    if settings.engine is EngineKind.OPENAI:
        from processor.engines.openai_engine import OpenAIEngine

        return OpenAIEngine.from_settings(settings)
    raise EngineStartupError(f"ENGINE={settings.engine!r} is not one of extractive, transformers, vllm, openai")


def attach_metrics(engine: Engine, metrics: "Metrics") -> None:
    """Engine-side metrics and readiness (ENGINE=openai: request latency, in flight, retries, server reachable)."""
    attach = getattr(engine, "attach_metrics", None)
    if attach is not None:
        attach(metrics)
