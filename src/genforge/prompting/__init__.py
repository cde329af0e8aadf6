"""Prompting recipes over any `ChatModel`: templates with declared variables, chains of parsed
steps, few-shot example selection under a token budget, chain-of-thought with self-consistency,
self-refine, tree of thoughts, and LLMLingua-style prompt compression.

See docs/agents.md (prompting recipes) for runnable examples.
"""

from .chain import Chain, ChainError, ChainResult, Step, StepError, StepRecord
from .compression import (
    CausalLMScorer,
    CompressionError,
    CompressionResult,
    RandomScorer,
    Segment,
    compress_prompt,
    split_marked,
)
from .cot import (
    ZERO_SHOT_TRIGGER,
    CoTResult,
    CoTVote,
    answer_extractor,
    chain_of_thought,
    cot_examples_prompt,
    extract_choice,
    extract_number,
    self_consistent_cot,
)
from .fewshot import (
    FewShotError,
    FewShotPrompt,
    FewShotResult,
    FixedSelector,
    MMRSelector,
    RandomSelector,
    SemanticSelector,
    mmr_order,
    token_counter,
)
from .parsers import ChoiceParser, JSONParser, NumberParser, OutputParser, ParseError, RegexParser, TextParser
from .refine import RefineResult, RefineRound, SelfRefine, read_score
from .templates import PromptTemplate, PromptTemplateError, load_template
from .tree_of_thoughts import (
    Game24,
    Game24State,
    ModelProposer,
    ModelValuer,
    ModelVoter,
    ThoughtNode,
    ToTResult,
    tree_of_thoughts,
)

__all__ = [
    "ZERO_SHOT_TRIGGER",
    "CausalLMScorer",
    "Chain",
    "ChainError",
    "ChainResult",
    "ChoiceParser",
    "CoTResult",
    "CoTVote",
    "CompressionError",
    "CompressionResult",
    "FewShotError",
    "FewShotPrompt",
    "FewShotResult",
    "FixedSelector",
    "Game24",
    "Game24State",
    "JSONParser",
    "MMRSelector",
    "ModelProposer",
    "ModelValuer",
    "ModelVoter",
    "NumberParser",
    "OutputParser",
    "ParseError",
    "PromptTemplate",
    "PromptTemplateError",
    "RandomScorer",
    "RandomSelector",
    "RefineResult",
    "RefineRound",
    "RegexParser",
    "Segment",
    "SelfRefine",
    "SemanticSelector",
    "Step",
    "StepError",
    "StepRecord",
    "TextParser",
    "ThoughtNode",
    "ToTResult",
    "answer_extractor",
    "chain_of_thought",
    "compress_prompt",
    "cot_examples_prompt",
    "extract_choice",
    "extract_number",
    "load_template",
    "mmr_order",
    "read_score",
    "self_consistent_cot",
    "split_marked",
    "token_counter",
    "tree_of_thoughts",
]
