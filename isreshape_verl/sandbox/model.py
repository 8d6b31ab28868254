"""The sandbox policy: a tiny Qwen2 causal LM built from a config, and a char-level tokenizer built at
run time with the `tokenizers` package (nothing is downloaded). `--model PATH` loads any local Hugging
Face model folder instead; both go through the same `Policy` (model + tokenizer + prompt formatting).

Simplified: the tiny model is char-level (one token per character), so prompts of ~10–50 characters are
~10–50 tokens; it ties input and output embeddings and uses fp32 everywhere.

    isreshape-verl compare --hidden-size 128 --num-layers 4     # the tiny model's shape (the defaults)
    isreshape-verl compare --model path/to/hf_model_folder       # any local causal LM instead
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from isreshape_verl.cli_args import check

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# Every character the procedural task (and short English questions) can contain.
CHARSET = (
    "0123456789+-*/=?.,:;!'\"()$%#&\n "
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


@dataclass
class TinyModelArgs:
    """Shape of the tiny Qwen2 policy (the defaults: 0.60 M parameters with the char-level vocabulary)."""

    hidden_size: int = 128
    """Tiny Qwen2: width of the residual stream."""
    num_layers: int = 4
    """Tiny Qwen2: transformer blocks."""
    num_heads: int = 4
    """Tiny Qwen2: attention heads; head_dim = hidden_size / num_heads must be a whole number >= 32 (as
    Qwen-style kernels expect)."""
    num_kv_heads: int = 2
    """Tiny Qwen2: key/value heads (grouped-query attention, as in Qwen2); divides num_heads."""
    intermediate_size: int = 256
    """Tiny Qwen2: width of the SwiGLU MLP."""
    max_positions: int = 256
    """Tiny Qwen2: longest prompt + response it is built for."""

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_positions"):
            check(name, getattr(self, name), getattr(self, name) > 0, "> 0")
        check("num_heads", self.num_heads,
              self.hidden_size % self.num_heads == 0 and self.hidden_size // self.num_heads >= 32,
              f"a divisor of --hidden-size ({self.hidden_size}) that leaves head_dim >= 32")
        check("num_kv_heads", self.num_kv_heads, self.num_heads % self.num_kv_heads == 0,
              f"a divisor of --num-heads ({self.num_heads})")


def build_char_tokenizer():
    """A char-level `PreTrainedTokenizerFast` over CHARSET, built with the `tokenizers` package."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in CHARSET:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # every char, "\n" too
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def build_tiny_qwen2(vocab_size: int, args: TinyModelArgs, pad_id: int, eos_id: int):
    """A freshly initialised `Qwen2ForCausalLM` (transformers), from a config only."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        max_position_embeddings=args.max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        attention_dropout=0.0,
        use_cache=True,
    )
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


# what transformers' from_pretrained loads a PyTorch model from (besides any *.safetensors shard)
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_model_dir(path: str) -> None:
    """Fail early (before any work) unless `path` looks like a local Hugging Face causal-LM folder."""
    if not os.path.isdir(path):
        raise ValueError(f"--model {path!r} is not a folder (a local Hugging Face model folder is expected)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--model {path!r} is not a model: it has no config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--model {path!r}: config.json is unreadable ({err})") from None
    if "model_type" not in config:
        raise ValueError(f"--model {path!r}: config.json has no model_type; not a transformers model")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"--model {path!r} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    if not any(name in WEIGHT_FILES or name.endswith(".safetensors") for name in os.listdir(path)):
        raise ValueError(f"--model {path!r} has no weights (model.safetensors, pytorch_model.bin or a sharded "
                         "*.index.json); save the model with save_pretrained, or finish its download")


class Policy:
    """A causal LM and its tokenizer, with the one prompt format the sandbox uses everywhere."""

    def __init__(self, model, tokenizer, use_chat_template: bool, description: str):
        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self.description = description
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the prompt: the chat template when the tokenizer has one, else `question + "\\n"`."""
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(question + "\n", add_special_tokens=False)["input_ids"]

    def response_ids(self, solution: str) -> list[int]:
        """Token ids of a target response (warm start), ending in EOS."""
        return self.tokenizer(solution, add_special_tokens=False)["input_ids"] + [self.eos_id]


def tiny_policy(args: TinyModelArgs, seed: int) -> Policy:
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    model = build_tiny_qwen2(len(tokenizer), args, tokenizer.pad_token_id, tokenizer.eos_token_id)
    return Policy(model, tokenizer, use_chat_template=False, description=f"tiny Qwen2 {asdict(args)}")


def local_policy(path: str) -> Policy:
    """Any local Hugging Face causal-LM folder (same code path as the tiny model), in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return Policy(model, tokenizer, use_chat_template=has_template, description=f"local model {path}")


def build_policy(model_path: str | None, tiny: TinyModelArgs, seed: int = 0) -> Policy:
    """The policy of a run: the tiny Qwen2 (from `tiny`, initialised with `seed`) or the local model at `model_path`.
    Picklable by reference, so a generator process can rebuild the same policy."""
    return local_policy(model_path) if model_path else tiny_policy(tiny, seed)
