"""genforge as a model of lm-evaluation-harness (Gao et al., EleutherAI), registered as "genforge".

With this module imported, `lm_eval.simple_evaluate(model="genforge", model_args={"pretrained":
directory}, tasks=[...])` or `simple_evaluate(model=GenforgeLM(model, tokenizer), ...)` scores
a genforge model on any lm-eval task. The three request kinds call the functions genforge's own
harness uses (`harness.loglikelihood`, `loglikelihood_rolling`, `generate_until`), so both
harnesses give the same numbers on the same task. lm_eval is an optional dependency (the
`test` extra); importing this module without it raises an ImportError that says so.
"""

from __future__ import annotations

from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # an optional dependency: say how to get it
    raise ImportError("genforge.evaluate.lm_eval_model needs lm-evaluation-harness: pip install lm_eval") from error

from ..model import Transformer
from ..tokenizer import Tokenizer
from . import harness
from .base import MetricError


@register_model("genforge")
class GenforgeLM(LM):
    """An lm-eval `LM` backed by a genforge `Transformer` and `Tokenizer`.

    Give either `model` and `tokenizer`, or `pretrained`: a checkpoint directory that
    `genforge.loading.load_for_inference` reads.
    """

    def __init__(
        self,
        model: Transformer | None = None,
        tokenizer: Tokenizer | None = None,
        *,
        pretrained: str | None = None,
        batch_size: int | str = 8,
        max_gen_toks: int = harness.DEFAULT_MAX_GEN_TOKS,
        **_: Any,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            from ..loading import load_for_inference

            loaded = load_for_inference(pretrained)
            model, tokenizer = loaded.model, loaded.tokenizer
        if model is None or tokenizer is None:
            raise MetricError("GenforgeLM needs model= and tokenizer=, or pretrained=<checkpoint directory>")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not supported: 8
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        return harness.loglikelihood(self.model, self.tokenizer, pairs, batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests) -> list[float]:
        return harness.loglikelihood_rolling(self.model, self.tokenizer, [r.args[0] for r in requests])

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:  # each request carries its own stop strings and limits
            context, kwargs = request.args[0], dict(request.args[1] if len(request.args) > 1 else {})
            until = kwargs.pop("until", None) or []
            do_sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            outputs += harness.generate_until(
                self.model,
                self.tokenizer,
                [context],
                until=[until] if isinstance(until, str) else list(until),
                max_gen_toks=int(kwargs.pop("max_gen_toks", self.max_gen_toks)),
                temperature=temperature,
            )
        return outputs


__all__ = ["GenforgeLM"]
