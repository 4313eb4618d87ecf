"""genfarm: distributed batch and online content generation with Ray and vLLM."""

__version__ = "0.1.0"
