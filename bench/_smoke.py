"""What the bench scripts' --smoke runs share: toy-sized offline inputs in a scratch folder.

A smoke run takes a script's own code path end to end at toy sizes, in seconds, so that a moved or
renamed tune_kd function breaks tests/bench/test_bench_smoke.py instead of the next real measurement.
Nothing here reads ../shared (the real tokenizers) or writes under the repository's results/.
(A helper, not a bench script: the leading underscore keeps it off the smoke test's list.)
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

# the student and teacher of a smoke run: big enough to be a Llama, small enough to train in a blink
TINY_ARCH = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 128}
TEACHER_ARCH = dict(TINY_ARCH, hidden_size=64, num_attention_heads=4, intermediate_size=128)
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def scratch(name: str) -> Path:
    """A fresh temporary folder, removed when the process exits."""
    from tune_kd.model.hardware import quiet_progress_bars

    quiet_progress_bars()    # a smoke run's output is its figures
    folder = Path(tempfile.mkdtemp(prefix=f"tune_kd-smoke-{name}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def save_teacher(tokenizer, directory: Path, arch: dict | None = None, seed: int = 0) -> Path:
    """An untrained Llama teacher saved as a model directory with its tokenizer (what a trained one
    looks like on disk; a smoke run checks plumbing, not what the teacher knows)."""
    import torch

    from tune_kd.config.experiment import ArchSpec, ModelSpec
    from tune_kd.model.build import build_model
    from tune_kd.model.checkpoint import save_student

    torch.manual_seed(seed)
    save_student(build_model(ModelSpec(arch=ArchSpec(**(arch or TEACHER_ARCH))), tokenizer, "teacher"), tokenizer, directory)
    return directory


def tiny_demo(root: Path, conversations: int = 256, val: int = 32, student: int = 128) -> Path:
    """The embedded demo's layout (results/demo/) at toy size: data/{train,val,student}.jsonl,
    tokenizer/ and an untrained teacher/, whose teacher.json makes demo.prepare(root) reuse it."""
    from tune_kd.search import demo

    demo.write_jsonl(root / "data" / "train.jsonl", demo.make_conversations(conversations, demo.DEMO_SEED))
    demo.write_jsonl(root / "data" / "val.jsonl", demo.make_conversations(val, demo.DEMO_SEED + 1))
    demo.write_jsonl(root / "data" / "student.jsonl", demo.make_conversations(student, demo.DEMO_SEED + 2))
    tokenizer = demo.build_tokenizer(root / "tokenizer")
    save_teacher(tokenizer, root / "teacher")
    (root / "teacher" / "teacher.json").write_text(json.dumps({"val_acc": 0.0, "val_ce": float("nan"),
                                                               "smoke": "untrained"}))
    return root


def demo_overrides(root: Path, train_file: str = "student.jsonl") -> dict:
    """Dotted overrides that point an embedded-demo YAML (search_spaces/kd.yaml and its kin) at
    tiny_demo(root), with the tiny student and small batches."""
    return {"embedded_demo": False, "teacher.path": str(root / "teacher"),
            "data.path": str(root / "data" / train_file), "data.val_path": str(root / "data" / "val.jsonl"),
            "data.cache_dir": str(root / "cache"), "student.arch": dict(TINY_ARCH), "train.batch_size": 16,
            "train.dtype": "float32", "logging.tensorboard": False}


def bpe_tokenizer(directory: Path, texts: list[str], vocab_size: int = 400):
    """A small byte-level BPE with ChatML's special tokens and template, trained on `texts` in
    milliseconds: the shape of MiniMind's and Qwen2.5's tokenizers, which a smoke run may not read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", unk_token=None)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def digits_bpe(directory: Path):
    """bpe_tokenizer trained on the embedded demo's digit conversations: a stand-in for MiniMind's
    tokenizer in the worlds of bench/on_policy_warm_start.py and the scripts that reuse it."""
    from tune_kd.search import demo

    sample = [turn["content"] for record in demo.make_conversations(400, seed=5) for turn in record["conversations"]]
    return bpe_tokenizer(directory, sample + ["system user assistant"], vocab_size=300)


def conversation_texts(path: Path) -> list[str]:
    """Every turn's text of a chat JSONL (either layout), the corpus bpe_tokenizer trains on."""
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts += [turn["content"] for turn in record.get("conversations") or record.get("messages")]
    return texts + ["system user assistant"]
