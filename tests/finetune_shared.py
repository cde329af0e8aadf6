"""What the LoRA and DoRA tests share: the token batch, the tiny saved base models, and
randomized adapter tensors."""

import reference_models
import torch

TOKENS = torch.tensor([[5, 17, 3, 44, 90, 12, 8, 61, 33], [7, 7, 21, 80, 2, 45, 19, 66, 4]])


def saved_families(tmp_path_factory):
    """family -> directory of its tiny random transformers model (rebuilt identically by
    reference_models.build), each saved once: the body of a test module's `base_dir` fixture."""
    saved = {}

    def get(family: str):
        if family not in saved:
            directory = tmp_path_factory.mktemp(family)
            reference_models.build(family).save_pretrained(directory)
            saved[family] = directory
        return saved[family]

    return get


def randomize(named_parameters, seed: int = 1) -> None:
    """Random non-zero A and B, so every part's update shows in the logits."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in named_parameters:
            if "lora_A" in name or "lora_B" in name:
                parameter.normal_(0, 0.1)


CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def tiny_chat_model_dir(directory, seed: int = 0, **overrides):
    """A tiny random Llama-layout genforge model with a small byte-level BPE tokenizer (ChatML
    template, trained on a few sentences) saved as a Hugging Face directory: what `genforge
    finetune` reads. Returns the directory."""
    from factories import TINY_DECODER
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from genforge.checkpoint import save_model
    from genforge.config import Config
    from genforge.model import Transformer
    from genforge.tokenizer import Tokenizer

    bpe = RustTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = ["What is two plus three? It is five.", "Name the colour of the sky. Blue.", "def add(a, b):"] * 10
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tokenizer = Tokenizer(bpe, special | {"chat_template": CHATML})
    torch.manual_seed(seed)
    settings = TINY_DECODER | {"vocab_size": bpe.get_vocab_size(), "max_position_embeddings": 128} | overrides
    save_model(Transformer(Config(**settings)), directory, tokenizer)
    return directory


def arithmetic_records(count: int, seed: int = 0) -> list[dict]:
    """Chat records of small sums, a task a tiny model learns in a few steps."""
    import random

    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randrange(10), rng.randrange(10)
        records.append(
            {"messages": [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]}
        )
    return records
