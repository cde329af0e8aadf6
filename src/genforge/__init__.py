"""genforge: the generative-AI stack in one readable, tested, fast codebase."""

__version__ = "0.1.0"
