"""A "pretrained" model directory as users have one: a tiny Llama saved with ``save_pretrained`` next to a real BPE
tokenizer (trained offline with ``tokenizers`` on the standard library's sources) that carries a chat template.

Nothing is downloaded. ``make_model_dir(path)`` writes the directory; the ``model_dir`` fixture in ``conftest.py``
builds it once per test session (per xdist worker).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch

# ChatML-style, like many instruction-tuned models: every turn is `<|im_start|>{role}\n{content}<|im_end|>\n`, and the
# generation prompt opens an assistant turn. Llama 3's own template has the same shape with other marker tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512
MODEL_CONFIG: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def _training_text(max_bytes: int = 400_000) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for name in ("textwrap.py", "string.py", "argparse.py", "json/__init__.py", "shutil.py"):
        text = (stdlib / name).read_text(encoding="utf-8")
        texts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return texts


def make_tokenizer(out: Path | None = None, chat_template: bool = True, pad_token: bool = False) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` of :data:`VOCAB_SIZE` tokens; saved to ``out`` if given.

    Like Llama 3's, it has no pad token unless ``pad_token=True``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS + (["<|pad|>"] if pad_token else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>" if pad_token else None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if out is not None:
        tokenizer.save_pretrained(out)
    return tokenizer


def make_model_dir(out: Path, chat_template: bool = True, pad_token: bool = False, **config: Any) -> Path:
    """Write a tiny bf16 Llama (``save_pretrained``) and its tokenizer to ``out``; returns ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out, chat_template=chat_template, pad_token=pad_token)
    torch.manual_seed(0)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**MODEL_CONFIG, **config},
    )
    model = LlamaForCausalLM(model_config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


def instruction_records(limit: int = 200) -> list[dict[str, str]]:
    """Alpaca-style (docstring -> implementation) pairs from documented functions of the standard library: real
    instruction data that ships with every machine, the same on every run."""
    import ast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records: list[dict[str, str]] = []
    modules = ("textwrap.py", "string.py", "shutil.py", "argparse.py", "difflib.py", "calendar.py", "inspect.py")
    for name in (*modules, "tempfile.py", "functools.py", "os.py", "csv.py", "fractions.py", "statistics.py"):
        source = (stdlib / name).read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and (doc := ast.get_docstring(node)):
                body = ast.get_source_segment(source, node) or ""
                records.append(
                    {
                        "instruction": f"Write the Python function `{node.name}`.",
                        "input": doc.split("\n\n")[0][:200],
                        "output": body[:400],
                    }
                )
                if len(records) >= limit:
                    return records
    return records


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path
