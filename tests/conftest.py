import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))

import reference_models  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all per-op overhead: a second intra-op thread only adds
    synchronisation, and costs several times over when other processes share the cores.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """A function: family name -> (transformers model, directory it was saved to)."""
    built = {}

    def get(name: str):
        if name not in built:
            model = reference_models.build(name)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            built[name] = (model, directory)
        return built[name]

    return get


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    """A tiny random Llama saved with the real all-MiniLM WordPiece tokenizer and a chat
    template. Its embedding table is padded past the tokenizer's 30522 tokens, and the padded
    rows are made the most likely outputs: they must still never be generated."""
    from genforge.checkpoint import save_model
    from genforge.config import Config
    from genforge.encoder import default_encoder_path
    from genforge.model import Transformer
    from genforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(default_encoder_path())
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Config(
        family="llama",
        vocab_size=30592,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():  # padded rows aligned with the final hidden state of the prompt "x"
        hidden = model(torch.tensor([tokenizer.encode("x")])).hidden_states[0, -1]
        model.lm_head.weight[tokenizer.vocab_size :] = hidden * 10
    return save_model(model, tmp_path_factory.mktemp("tiny") / "model", tokenizer=tokenizer)


def _bpe_corpus() -> str:
    # Some prose (the standard library's json module docs) plus the symbols JSON needs.
    import json as json_module

    text = open(json_module.__file__, encoding="utf-8").read()[:6000]
    return text + ' {"name": "x", "age": 12, "tags": ["a", "b"]} 0123456789 [] {} "" : , true false null -1.5e3 '


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A tiny byte-level BPE tokenizer (the all-MiniLM WordPiece one is not byte-level)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from genforge.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>", "<bos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([_bpe_corpus()], trainer)
    return Tokenizer(backend, {"eos_token": "<eos>", "bos_token": "<bos>"})


@pytest.fixture(scope="session")
def bpe_model(bpe_tokenizer, tmp_path_factory):
    """A random tiny Llama over that tokenizer, embedding padded past its vocabulary to 448 rows."""
    from genforge.checkpoint import load_model, save_model
    from genforge.config import Config
    from genforge.model import Transformer

    config = Config(
        family="llama",
        vocab_size=448,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        eos_token_id=bpe_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = Transformer(config)
    directory = save_model(model, tmp_path_factory.mktemp("bpe") / "model", tokenizer=bpe_tokenizer)
    return load_model(directory)


# The vision tests share the digits at 16x16 and the digits classifier, trained once per session
# (about 20 s) into a temporary cache.
@pytest.fixture(scope="session")
def digits16():
    from genforge.vision.data import load_digits

    return load_digits(16)


@pytest.fixture(scope="session")
def classifier16(tmp_path_factory):
    from genforge.vision.classifier import digits_classifier

    return digits_classifier(16, cache_dir=tmp_path_factory.mktemp("vision_cache"))
