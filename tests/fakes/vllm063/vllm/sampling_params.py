"""vllm.sampling_params of the 0.6.3 double: where 0.6.3 (and V1) define RequestOutputKind."""

from vllm import RequestOutputKind, SamplingParams

__all__ = ["RequestOutputKind", "SamplingParams"]
