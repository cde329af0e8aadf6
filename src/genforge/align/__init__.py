"""Alignment: fit a language model to preferences or to a reward.

- `logprobs`: completion-only sequence log-probabilities of a causal LM, the input of every
  objective here (`completion_logprobs`), without a full-vocabulary log-softmax copy.
- `losses`: the objectives as functions of tensors: DPO (sigmoid, conservative, hinge, IPO,
  robust), KTO, ORPO, SimPO, the GRPO per-token loss and the Bradley-Terry reward-model loss.
- `reward`: a reward model, any genforge decoder with a scalar head read at the last real
  token; loads and saves transformers' `...ForSequenceClassification` checkpoints.
- `data`: preference pairs (prompt, chosen, rejected; plain text or chat messages) from JSONL,
  checked and tokenized with explicit length rules.
- `preference`: the preference trainer (DPO, IPO, cDPO, hinge, robust DPO, ORPO, SimPO) over
  the fine-tuning run's loop and methods.
- `reward_train`: the reward model trained on pairs (Bradley-Terry, margins, centring).
- `kto`: KTO on unpaired desirable / undesirable completions.
- `rollout`, `ppo`, `grpo`, `rewards`: online RL. Batched rollouts; PPO with a value head, GAE
  and an adaptive KL controller; GRPO with group-normalised advantages; reward functions
  (exact match, format, a reward model, unit tests, or your own).
- `arithmetic`: an embedded addition task where DPO and GRPO visibly work.
- `constitutional`: critique-and-revise pairs from written principles (Bai et al. 2022).
- `cli`: `genforge align {reward,dpo,...,kto,...}`, one registry entry per method.
"""

from .arithmetic import (
    AdditionProblem,
    AdditionTask,
    AlignmentReport,
    DPOSettings,
    GRPOSettings,
    PretrainSettings,
    addition_tokenizer,
    dpo_on_addition,
    evaluate_alignment,
    exact_match_accuracy,
    grpo_on_addition,
    held_out_kl,
    preference_pairs_from_samples,
    pretrain_addition,
)
from .constitutional import CritiqueSettings, Principle, constitutional_pairs, load_principles, load_prompts
from .data import (
    PreferenceDataError,
    PreferenceDataset,
    PreferencePair,
    PreferenceRows,
    parse_preference_record,
    read_preference_records,
    tokenize_preference_record,
)
from .grpo import (
    GRPOConfig,
    GRPOError,
    GRPOResult,
    GRPOTrainer,
    RewardFunction,
    RewardFunctionError,
    compute_rewards,
    group_advantages,
    train_grpo,
)
from .kto import KTOConfig, KTOError, KTOResult, train_kto
from .logprobs import CompletionLogProbs, completion_logprobs, token_logprobs
from .losses import (
    DPO_LOSS_TYPES,
    GRPO_LOSS_TYPES,
    GRPOLoss,
    PreferenceLoss,
    dpo_loss,
    grpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    reward_model_loss,
    simpo_loss,
)
from .ppo import (
    AdaptiveKLController,
    FixedKLController,
    PPOConfig,
    PPOError,
    PPOResult,
    PPOTrainer,
    ValueHead,
    gae_advantages,
    kl_penalized_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    train_ppo,
)
from .preference import (
    PREFERENCE_LOSSES,
    PREFERENCE_METHODS,
    PreferenceConfig,
    PreferenceError,
    PreferenceObjective,
    PreferenceResult,
    reference_logprobs,
    train_preferences,
)
from .reward import (
    SEQUENCE_CLASSIFIERS,
    PairwiseAccuracy,
    RewardModel,
    last_token_index,
    pairwise_accuracy,
    score_sequences,
)
from .reward_train import RewardConfig, RewardResult, RewardTrainingError, train_reward_model
from .rewards import exact_match_reward, extract_answer, format_reward, reward_model_reward, unit_test_reward

__all__ = [
    "load_prompts",
    "load_principles",
    "constitutional_pairs",
    "Principle",
    "CritiqueSettings",
    "preference_pairs_from_samples",
    "pretrain_addition",
    "held_out_kl",
    "grpo_on_addition",
    "exact_match_accuracy",
    "evaluate_alignment",
    "dpo_on_addition",
    "addition_tokenizer",
    "PretrainSettings",
    "GRPOSettings",
    "DPOSettings",
    "AlignmentReport",
    "AdditionProblem",
    "AdditionTask",
    "ValueHead",
    "FixedKLController",
    "AdaptiveKLController",
    "ppo_value_loss",
    "ppo_policy_loss",
    "kl_penalized_rewards",
    "masked_whiten",
    "gae_advantages",
    "train_ppo",
    "PPOError",
    "PPOResult",
    "PPOTrainer",
    "PPOConfig",
    "unit_test_reward",
    "reward_model_reward",
    "format_reward",
    "extract_answer",
    "exact_match_reward",
    "train_grpo",
    "group_advantages",
    "compute_rewards",
    "RewardFunctionError",
    "RewardFunction",
    "GRPOTrainer",
    "GRPOResult",
    "GRPOError",
    "GRPOConfig",
    "train_reward_model",
    "RewardTrainingError",
    "RewardResult",
    "RewardConfig",
    "train_kto",
    "KTOResult",
    "KTOError",
    "KTOConfig",
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "PREFERENCE_LOSSES",
    "PREFERENCE_METHODS",
    "SEQUENCE_CLASSIFIERS",
    "CompletionLogProbs",
    "GRPOLoss",
    "PairwiseAccuracy",
    "PreferenceConfig",
    "PreferenceDataError",
    "PreferenceDataset",
    "PreferenceError",
    "PreferenceLoss",
    "PreferenceObjective",
    "PreferencePair",
    "PreferenceResult",
    "PreferenceRows",
    "RewardModel",
    "completion_logprobs",
    "dpo_loss",
    "grpo_loss",
    "kto_loss",
    "kto_reference_point",
    "last_token_index",
    "orpo_loss",
    "pairwise_accuracy",
    "parse_preference_record",
    "read_preference_records",
    "reference_logprobs",
    "reward_model_loss",
    "score_sequences",
    "simpo_loss",
    "token_logprobs",
    "tokenize_preference_record",
    "train_preferences",
]
